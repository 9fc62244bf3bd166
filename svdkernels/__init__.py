"""svdkernels: PyTorch kernels for SVD-centric deep learning.

Importing this package registers the ops under ``torch.ops.svdkernels``; it never
initialises CUDA, imports triton, compiles or downloads anything.
"""
from svdkernels import adapters, quant
from svdkernels.adapters.adapt import adapt
from svdkernels.backends import use_backend
from svdkernels.errors import FormatError
from svdkernels import linalg
from svdkernels.linalg import kpsvd, kron_sbl, pca_lowrank, pivoted_qr, robust_svd, select_columns, svd_lowrank
from svdkernels.ops.kron_linear import kron_linear
from svdkernels.ops.lowrank_adam_step import lowrank_adam_step
from svdkernels.ops.lowrank_attention import RoPE, lowrank_attention, lowrank_attention_with_tail, merge_attention
from svdkernels.ops.lowrank_quant import lowrank_quantize_act, lowrank_w4a4_gemm, lowrank_w4a4_linear, lowrank_w4a16_linear
from svdkernels.ops.rsvd import PVEResult, rsvd, rsvd_pve
from svdkernels.linalg import select_rank
from svdkernels import analysis, compress, kv, train

__all__ = [
    "FormatError", "adapt", "adapters", "kpsvd", "kron_linear", "lowrank_quantize_act", "lowrank_w4a4_gemm", "lowrank_w4a4_linear",
    "lowrank_w4a16_linear",
    "quant", "rsvd", "rsvd_pve", "PVEResult", "select_rank", "use_backend",
    "linalg", "kron_sbl", "pca_lowrank", "pivoted_qr", "robust_svd", "select_columns", "svd_lowrank",
    "RoPE", "analysis", "compress", "kv", "lowrank_adam_step", "train", "lowrank_attention", "lowrank_attention_with_tail", "merge_attention",
]
__version__ = "0.1.0"
