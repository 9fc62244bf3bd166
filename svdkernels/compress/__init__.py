"""Low-rank model compression: ``compress_model`` (SVD, FWSVD, ASVD, SVD-LLM, Basis
Sharing with a global rank budget), ``LowRankLinear``, safetensors save/load, and
``compress_experts`` for mixture-of-experts blocks."""
from svdkernels.compress.budget import Unit, allocate_global, allocate_uniform
from svdkernels.compress.io import load_compressed, save_compressed
from svdkernels.compress.linear import LowRankInt4Linear, LowRankLinear
from svdkernels.compress.model import BUDGETS, METHODS, SHARED_KINDS, compress_model, layer_kind
from svdkernels.compress.moe import MOE_METHODS, LowRankExperts, compress_experts, kmeans_cosine

__all__ = [
    "BUDGETS",
    "METHODS",
    "MOE_METHODS",
    "LowRankExperts",
    "LowRankInt4Linear",
    "SHARED_KINDS",
    "LowRankLinear",
    "Unit",
    "allocate_global",
    "allocate_uniform",
    "compress_experts",
    "compress_model",
    "kmeans_cosine",
    "layer_kind",
    "load_compressed",
    "save_compressed",
]
