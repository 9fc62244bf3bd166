"""Small models and data for the adapter tests (shared by several test modules)."""
from __future__ import annotations

import torch
from torch import nn

from svdkernels.testing.matrices import spectral_matrix


def toy_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Four linear layers in three shape groups, with decaying spectra (as trained weights
    have), so the principal components are well separated and rsvd resolves them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 64),
                          nn.Tanh(), nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        for i, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
            W = spectral_matrix("exp", layer.out_features, layer.in_features, decay=0.05, seed=i).A
            layer.weight.copy_(4 * W)
    return model.to(dtype)


def calib_batches() -> list[torch.Tensor]:
    """Three ``[24, 64]`` input batches for CorDA / EVA calibration."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(24, 64, generator=g) for _ in range(3)]


def inputs(n: int = 10) -> torch.Tensor:
    """``[n, 64]`` fixed inputs for :func:`toy_model`."""
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(2))


def perturb(model: nn.Module, seed: int = 3, size: float = 0.05) -> None:
    """Add Gaussian noise of std ``size`` to every trainable parameter (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * size)
