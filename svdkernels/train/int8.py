"""Q-GaLore's INT8 weights: :class:`Int8Linear`, updated with stochastic rounding.

Q-GaLore (Zhang et al. 2024) keeps the weights of the projected layers in INT8 (groups
of 256 along the input features) and rounds each update stochastically, so that
updates smaller than a quantisation step still move the weight in expectation.

Layout: ``qweight [out, in]`` int8 in ``[-127, 127]``; ``scales [out, ceil(in/256)]``
float32 with ``scale = absmax(group)/127``; ``W ≈ qweight · scales[:, k // 256]``.

Training: the layer's ``qweight`` is a ``requires_grad=False`` int8 parameter (torch
cannot hold a float gradient on it); the backward pass stores the float32 weight
gradient as ``qweight.float_grad`` (Q-GaLore's convention), and
:class:`svdkernels.train.LowRankAdamW` reads it, steps a transient float32 copy of the
weight and writes it back with :func:`quantize_int8` and stochastic rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from svdkernels.ops.lowrank_adam_step import sr_uniform

GROUP = 256


def _groups(K: int) -> int:
    return -(-K // GROUP)


def _expand(scales: torch.Tensor, K: int) -> torch.Tensor:
    return scales[:, torch.arange(K, device=scales.device) // GROUP]


def quantize_int8(W: torch.Tensor, *, sr_seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [out, in]`` → ``(qweight int8 [out, in], scales float32 [out, ceil(in/256)])``.

    Symmetric, ``scale = absmax/127`` per group of 256 along ``in``; rounding to nearest,
    or stochastic with ``sr_seed`` (``floor(W/scale + u)``, ``u`` uniform in [0, 1) from a
    hash of ``(sr_seed, flat index)``: deterministic and unbiased).
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"W: expected a 2-D float tensor [out, in], got {getattr(W, 'shape', type(W).__name__)}")
    out, K = W.shape
    g = _groups(K)
    Wf = W.float()
    absmax = torch.nn.functional.pad(Wf.abs(), (0, g * GROUP - K)).view(out, g, GROUP).amax(-1)
    scales = absmax / 127
    s = _expand(scales, K)
    x = Wf / torch.where(s > 0, s, torch.ones_like(s))
    if sr_seed is None:
        q = torch.round(x)
    else:
        q = torch.floor(x + sr_uniform(sr_seed, x.numel(), x.device).view_as(x))
    return q.clamp_(-127, 127).to(torch.int8), scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``[out, in]`` that :func:`quantize_int8` stored, in ``dtype``."""
    return (qweight.float() * _expand(scales, qweight.shape[1])).to(dtype)


class _Int8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]):
        W = dequantize_int8(qweight, scales, x.dtype)
        ctx.save_for_backward(x, qweight, scales)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, W, bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, qweight, scales = ctx.saved_tensors
        W = dequantize_int8(qweight, scales, grad_y.dtype)
        grad_x = grad_y @ W if ctx.needs_input_grad[0] else None
        # The weight gradient lives beside the int8 parameter (torch allows no float .grad
        # on it); accumulated over micro-batches like .grad.
        gw = (grad_y.reshape(-1, grad_y.shape[-1]).mT.float() @ x.reshape(-1, x.shape[-1]).float())
        prev = getattr(qweight, "float_grad", None)
        qweight.float_grad = gw if prev is None else prev + gw
        for hook in getattr(qweight, "_float_grad_hooks", ()):
            hook(qweight)
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_b


class Int8Linear(nn.Module):
    """A linear layer with INT8 weights (group 256), dequantised in the forward pass.

    ``y = x · deq(qweight, scales)ᵀ + bias``. Train it with :class:`LowRankAdamW` (or a
    preset) in a low-rank group: :func:`svdkernels.train.lowrank_param_groups` selects
    Int8Linear layers like ``nn.Linear`` ones, and each update is written back to INT8
    with stochastic rounding.

    Example::

        layer = Int8Linear.from_linear(torch.nn.Linear(1024, 1024))
        opt = QGaLoreAdamW([dict(params=[layer.qweight], rank=64)])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {type(bias).__name__}")
        self.in_features, self.out_features = in_features, out_features
        self.qweight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                    requires_grad=False)
        self.qweight.int8_scales = None  # set below: the optimiser finds the scales from the parameter
        self.register_buffer("scales", torch.zeros(out_features, _groups(in_features), device=device))
        self.qweight.int8_scales = self.scales
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """The layer with ``linear``'s weight quantised (round to nearest) and its bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        q, s = quantize_int8(linear.weight.detach())
        layer.qweight.data.copy_(q)
        layer.scales.copy_(s)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def _apply(self, fn, recurse=True):  # keep the parameter's link to the (moved) scales
        out = super()._apply(fn, recurse)
        self.qweight.int8_scales = self.scales
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` the forward pass uses."""
        return dequantize_int8(self.qweight, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 \
                or x.shape[-1] != self.in_features:
            got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a floating-point tensor [..., {self.in_features}], got {got}")
        return _Int8LinearFn.apply(x, self.qweight, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 group {GROUP}"


def is_int8_weight(p: torch.Tensor) -> bool:
    """True for the ``qweight`` of an :class:`Int8Linear`."""
    return p.dtype == torch.int8 and getattr(p, "int8_scales", None) is not None
