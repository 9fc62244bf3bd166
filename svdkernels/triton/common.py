"""What every Triton kernel module shares (imported only with triton itself)."""
from __future__ import annotations

import torch
import triton


@triton.jit
def _probe() -> None:
    pass


def interpreted() -> bool:
    """Whether kernels are built by the Triton interpreter (``TRITON_INTERPRET=1`` when
    triton was imported): ``@triton.jit`` then returns an interpreter function instead
    of a ``JITFunction``. Decides whether CPU tensors are allowed and whether bf16 must
    be emulated (the interpreter mishandles it, triton#11584)."""
    return not isinstance(_probe, triton.runtime.JITFunction)


def check_device(name: str, t: torch.Tensor) -> None:
    """``ValueError`` naming ``name`` unless ``t`` is on CUDA or the interpreter runs."""
    if t.device.type != "cuda" and not interpreted():
        raise ValueError(
            f"{name}: the triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 set "
            f"before triton is imported), got device {t.device}"
        )
