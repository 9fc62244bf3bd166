"""Issue 12: xkv_compress names the argument for non-finite or empty inputs."""
from __future__ import annotations

import math

import pytest
import torch

from svdkernels.kv import xkv_compress
from svdkernels.testing.errors import assert_raises_naming


def _kv(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 12, 16, generator=g) for _ in range(n)], [torch.randn(2, 12, 16, generator=g)
                                                                     for _ in range(n)]


@pytest.mark.parametrize("which,i,value", [("keys", 1, math.nan), ("values", 2, math.inf), ("keys", 0, -math.inf)])
def test_non_finite_input_names_the_layer(which, i, value):
    keys, values = _kv()
    (keys if which == "keys" else values)[i][1, 3, 5] = value
    assert_raises_naming(lambda: xkv_compress(keys, values, rank_k=4, rank_v=4), ValueError,
                         [f"{which}[{i}]", "finite", "(1, 3, 5)"])


def test_empty_and_bad_settings():
    keys, values = _kv()
    assert_raises_naming(lambda: xkv_compress([k[:, :0] for k in keys], [v[:, :0] for v in values]), ValueError,
                         ["keys[0]", ">= 1"])
    assert_raises_naming(lambda: xkv_compress(keys, values, energy=math.nan), ValueError, ["energy", "nan"])
    assert_raises_naming(lambda: xkv_compress(keys, values, seed=2**70), ValueError, ["seed"])
    assert_raises_naming(lambda: xkv_compress(keys, values, rank=4), TypeError, ["rank", "'rank_k'"])
    assert_raises_naming(lambda: xkv_compress([k.to("meta") for k in keys], [v.to("meta") for v in values]),
                         ValueError, ["keys[0]", "meta"])


def test_tiny_and_huge_magnitudes_are_not_errors():
    keys, values = _kv(2)
    for scale in (1e-20, 1e20):
        groups = xkv_compress([k * scale for k in keys], [v * scale for v in values], rank_k=16, rank_v=16)
        rec = groups[0].keys(0)
        assert torch.isfinite(rec).all()
        torch.testing.assert_close(rec / scale, keys[0], rtol=1e-3, atol=1e-3)  # full rank: exact up to fp32
