"""``LowRankLinear``: a linear layer stored as two thin factors, ``W ≈ up·down``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LowRankLinear"]


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
