"""Accuracy checks the tests share: SQNR for quantised kernels, a float64 forward
error bound for exact ones (DESIGN: quantised kernels by SQNR, exact ones against a
bound derived from the computation, never a tolerance picked to pass)."""
from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
"""Unit roundoff ``u`` of each floating dtype (half an ulp of 1)."""


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``20·log10(‖ref‖/‖ref − out‖)`` in dB, computed in float64 (``inf`` when equal)."""
    ref, out = ref.double(), out.double()
    noise = float((ref - out).norm())
    if noise == 0:
        return math.inf
    return 20 * math.log10(float(ref.norm()) / noise)


def assert_within_bound(out: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor | float) -> None:
    """``|out − exact| <= bound`` elementwise (``exact`` the float64 result, ``bound``
    the forward error bound of the computation); the message counts the elements off
    and gives the worst excess."""
    assert out.shape == exact.shape, (out.shape, exact.shape)
    err = (out.double() - exact.double()).abs()
    bad = err > bound
    if bad.any():
        excess = err - bound
        raise AssertionError(f"{int(bad.sum())} of {err.numel()} elements off; worst excess {float(excess.max()):.3g}")
