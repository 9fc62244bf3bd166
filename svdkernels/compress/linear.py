"""``LowRankLinear``: a linear layer stored as two thin factors, ``W ≈ up·down``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LowRankInt4Linear", "LowRankLinear"]


class LowRankLinear(nn.Module):
    """``y = (x·downᵀ)·upᵀ + bias``: two thin GEMMs instead of one dense one.

    ``down`` ``[rank, in_features]``, ``up`` ``[out_features, rank]``, ``bias``
    ``[out_features]`` or None. At ``rank·(in + out) < in·out`` it stores fewer
    parameters and, for enough tokens, runs fewer FLOPs than the dense layer
    (``2·T·rank·(in + out)`` against ``2·T·in·out``).

    ``down`` may be one ``nn.Parameter`` shared by several layers (Basis Sharing:
    one input basis for a group of layers), in which case
    :func:`svdkernels.compress.save_compressed` stores it once.
    """

    def __init__(self, up: torch.Tensor, down: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        for name, t in (("up", up), ("down", down)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name}: expected a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"up, down: expected up [out, r] and down [r, in] with the same r, "
                             f"got {tuple(up.shape)} and {tuple(down.shape)}")
        if bias is not None and tuple(bias.shape) != (up.shape[0],):
            raise ValueError(f"bias: expected shape ({up.shape[0]},), got {tuple(bias.shape)}")
        self.up = up if isinstance(up, nn.Parameter) else nn.Parameter(up)
        self.down = down if isinstance(down, nn.Parameter) else nn.Parameter(down)
        self.bias = None if bias is None else (bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias))

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``up·down`` (computed in float32, rounded once
        to the factors' dtype) and the same bias."""
        dtype = self.up.dtype
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.up.device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_((self.up.float() @ self.down.float()).to(dtype))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"


class LowRankInt4Linear(nn.Module):
    """:class:`LowRankLinear` with both factors stored as SVDQuant int4 groups
    (``svdkernels/formats/int4.py``): ``y = (x·deq(down)ᵀ)·deq(up)ᵀ + bias``, each
    product one :func:`svdkernels.quant.lowrank_w4a16_linear` call (int4 weights
    unpacked in the kernel, float32 accumulation).

    Buffers: ``qdown [R, in/2]`` uint8 and ``sdown [R, in/64]``, ``qup [out, R/2]`` and
    ``sup [out, R/64]`` (scales in the activation dtype), ``bias [out]`` or None, where
    ``R`` is the rank rounded up to a multiple of 64 with zero rows/columns (exact: they
    add nothing). ``in_features`` must be a multiple of 64 (the int4 group). Inputs
    must have the scales' dtype. Inference only (no autograd for the packed factors).
    """

    def __init__(self, qdown: torch.Tensor, sdown: torch.Tensor, qup: torch.Tensor, sup: torch.Tensor,
                 bias: Optional[torch.Tensor], rank: int) -> None:
        super().__init__()
        from svdkernels.formats.int4 import GROUP_SIZE

        R, in_half = qdown.shape
        out = qup.shape[0]
        expected = {"sdown": (sdown, (R, 2 * in_half // GROUP_SIZE)), "qup": (qup, (out, R // 2)),
                    "sup": (sup, (out, R // GROUP_SIZE))}
        if R % GROUP_SIZE:
            raise ValueError(f"qdown: expected a padded rank that is a multiple of {GROUP_SIZE}, got {R}")
        for name, (t, shape) in expected.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= R:
            raise ValueError(f"rank: expected an int in [1, {R}], got {rank!r}")
        if bias is not None and tuple(bias.shape) != (out,):
            raise ValueError(f"bias: expected shape ({out},), got {tuple(bias.shape)}")
        self.register_buffer("qdown", qdown)
        self.register_buffer("sdown", sdown)
        self.register_buffer("qup", qup)
        self.register_buffer("sup", sup)
        self.register_buffer("bias", bias)
        self.rank = rank

    @classmethod
    def from_lowrank(cls, layer: LowRankLinear, *, dtype: Optional[torch.dtype] = None) -> "LowRankInt4Linear":
        """Quantise ``layer``'s factors (round to nearest, a scale per group of 64) for
        activations of ``dtype`` (default: the factors' dtype; float32, float16 or bfloat16)."""
        from svdkernels.formats.int4 import GROUP_SIZE, quantize_weight

        if not isinstance(layer, LowRankLinear):
            raise TypeError(f"layer: expected a LowRankLinear, got {type(layer).__name__}")
        if layer.in_features % GROUP_SIZE:
            raise ValueError(f"layer: in_features must be a multiple of {GROUP_SIZE} for int4 factors, "
                             f"got {layer.in_features}")
        dtype = layer.up.dtype if dtype is None else dtype
        r = layer.rank
        R = -(-r // GROUP_SIZE) * GROUP_SIZE
        with torch.no_grad():
            down = F.pad(layer.down.detach().float(), (0, 0, 0, R - r))  # zero rows: no output
            up = F.pad(layer.up.detach().float(), (0, R - r))  # zero columns: read nothing
            qdown, sdown = quantize_weight(down, dtype=dtype)
            qup, sup = quantize_weight(up, dtype=dtype)
            bias = None if layer.bias is None else layer.bias.detach().to(dtype).clone()
        return cls(qdown, sdown, qup, sup, bias, r)

    @property
    def in_features(self) -> int:
        return self.qdown.shape[1] * 2

    @property
    def out_features(self) -> int:
        return self.qup.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from svdkernels.ops.lowrank_quant import lowrank_w4a16_linear

        R = self.qdown.shape[0]
        none_in = x.new_empty(0, self.in_features)
        t = lowrank_w4a16_linear(x, self.qdown, self.sdown, L_down=none_in, L_up=x.new_empty(R, 0))
        return lowrank_w4a16_linear(t, self.qup, self.sup, L_down=x.new_empty(0, R),
                                    L_up=x.new_empty(self.out_features, 0), bias=self.bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``deq(up)·deq(down)`` (float32 product, rounded
        once to the scales' dtype) and the same bias."""
        from svdkernels.formats.int4 import dequantize_weight

        dtype = self.sup.dtype
        W = dequantize_weight(self.qup, self.sup, dtype=torch.float32) @ dequantize_weight(
            self.qdown, self.sdown, dtype=torch.float32)
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.qup.device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(W.to(dtype))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank} "
                f"(int4, padded to {self.qdown.shape[0]}), bias={self.bias is not None}")
