"""SVDQuant (Li et al. 2024) int4 formats and the low-rank + 4-bit linear ops.

- Formats (``svdkernels/quant/packing.py``, layouts documented there):
  :func:`quantize_weight`, :func:`dequantize_weight`, :func:`quantize_act`,
  :func:`dequantize_act`, :func:`pack_int4`, :func:`unpack_int4`,
  :func:`compensate_unsigned_bias`, ``GROUP_SIZE``, ``UNSIGNED_SHIFT``.
- Ops (``svdkernels/ops/lowrank_quant.py``): :func:`lowrank_w4a16_linear`,
  :func:`lowrank_quantize_act`, :func:`lowrank_w4a4_gemm`.
- The layer (``linear.py``): :class:`LowRankQuantLinear` (``from_float``, ``merge_lora``).
- Whole models (``model.py``, ``calibrate.py``): :func:`quantize_model` (SVDQuant
  with calibration, smoothing search and refinement), :func:`quantize_model_rtn`
  (the naive round-to-nearest baseline), :func:`layer_sqnr`.
- Files (``io.py``): :func:`save_quantized`, :func:`load_quantized` (safetensors).
"""
from __future__ import annotations

from typing import Any

from svdkernels.quant import packing
from svdkernels.quant.packing import (
    GROUP_SIZE,
    UNSIGNED_SHIFT,
    compensate_unsigned_bias,
    dequantize_act,
    dequantize_weight,
    pack_int4,
    quantize_act,
    quantize_weight,
    unpack_int4,
)

# After packing: the layer imports the ops, which import svdkernels.quant.packing.
from svdkernels.quant.linear import LowRankQuantLinear
from svdkernels.quant.calibrate import layer_sqnr
from svdkernels.quant.model import (
    DEFAULT_ALPHAS,
    DEFAULT_REFINE_ITERS,
    LayerChoice,
    QuantConfig,
    quantize_model,
    quantize_model_rtn,
)
from svdkernels.quant.io import load_quantized, save_quantized

_OPS = ("lowrank_quantize_act", "lowrank_w4a4_gemm", "lowrank_w4a16_linear")

__all__ = [
    *packing.__all__,
    *_OPS,
    "DEFAULT_ALPHAS",
    "DEFAULT_REFINE_ITERS",
    "LayerChoice",
    "LowRankQuantLinear",
    "QuantConfig",
    "layer_sqnr",
    "load_quantized",
    "quantize_model",
    "quantize_model_rtn",
    "save_quantized",
]

def __getattr__(name: str) -> Any:
    # The ops read the formats defined in this package (svdkernels.ops.lowrank_quant
    # imports svdkernels.quant.packing), so importing them here eagerly would make
    # the import order of the two matter; they are resolved on first access instead.
    if name in _OPS:
        from svdkernels.ops import lowrank_quant

        return getattr(lowrank_quant, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
