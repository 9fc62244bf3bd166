"""Adapter layers built on svdkernels ops (a layer never contains a kernel).

- :class:`KronLinear`: Kronecker adapters (SoKA init from the KPSVD, LoKr init),
  forward and backward through ``kron_linear``;
- :func:`load_lokr` / :func:`save_lokr`: peft LoKr adapters in and out of KronLinear.
"""
from svdkernels.adapters.kron import KronLinear, near_square_factors
from svdkernels.adapters.lokr import load_lokr, save_lokr

__all__ = ["KronLinear", "load_lokr", "near_square_factors", "save_lokr"]
