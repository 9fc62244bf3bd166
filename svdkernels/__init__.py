"""svdkernels: PyTorch kernels for SVD-centric deep learning.

Importing this package registers the ops under ``torch.ops.svdkernels``; it never
initialises CUDA, imports triton, compiles or downloads anything.
"""
from svdkernels.backends import use_backend
from svdkernels.ops.rsvd import rsvd
from svdkernels.spectral import select_rank

__all__ = ["rsvd", "select_rank", "use_backend"]
__version__ = "0.1.0"
