"""Random quantised layers for the low-rank + 4-bit op tests."""
from __future__ import annotations

from typing import Optional

import torch

from svdkernels.formats.int4 import quantize_weight


def random_w4a16_layer(
    N: int, K: int, r: int, dtype: torch.dtype, *, bias: bool = True, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``qweight [N, K/2], scales [N, K/64], L_down [r, K], L_up [N, r], bias [N] | None``
    of a Gaussian weight, in ``dtype`` (``L_down`` scaled by 1/√K so the branch is O(1))."""
    g = torch.Generator().manual_seed(seed)
    qweight, scales = quantize_weight(torch.randn(N, K, generator=g), dtype=dtype)
    L_down = (torch.randn(r, K, generator=g) / K**0.5).to(dtype)
    L_up = torch.randn(N, r, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return qweight, scales, L_down, L_up, b
