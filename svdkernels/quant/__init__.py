"""SVDQuant (Li et al. 2024) int4 formats and the low-rank + 4-bit linear ops.

- Formats (defined below the ops in ``svdkernels/formats/int4.py``, layouts documented there):
  :func:`quantize_weight`, :func:`dequantize_weight`, :func:`quantize_act`,
  :func:`dequantize_act`, :func:`pack_int4`, :func:`unpack_int4`,
  :func:`compensate_unsigned_bias`, ``GROUP_SIZE``, ``UNSIGNED_SHIFT``.
- Ops (``svdkernels/ops/lowrank_quant.py``): :func:`lowrank_w4a16_linear`,
  :func:`lowrank_quantize_act`, :func:`lowrank_w4a4_gemm`, or both in one call,
  :func:`lowrank_w4a4_linear`.
- The layer (``linear.py``): :class:`LowRankQuantLinear` (``from_float``, ``merge_lora``).
- Whole models (``model.py``, ``evaluate.py``; calibration in :mod:`svdkernels.calibration`): :func:`quantize_model` (SVDQuant
  with calibration, smoothing search and refinement), :func:`quantize_model_rtn`
  (the naive round-to-nearest baseline), :func:`layer_sqnr`.
- Files (``io.py``): :func:`save_quantized`, :func:`load_quantized` (safetensors).
"""
from __future__ import annotations

from svdkernels.formats import int4
from svdkernels.formats.int4 import (
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
from svdkernels.ops.lowrank_quant import (
    lowrank_quantize_act,
    lowrank_w4a4_gemm,
    lowrank_w4a4_linear,
    lowrank_w4a16_linear,
)
from svdkernels.quant.linear import LowRankQuantLinear
from svdkernels.quant.evaluate import layer_sqnr, sqnr_hooks
from svdkernels.quant.model import (
    DEFAULT_ALPHAS,
    DEFAULT_REFINE_ITERS,
    LayerChoice,
    QuantConfig,
    quantize_model,
    quantize_model_rtn,
)
from svdkernels.quant.io import load_quantized, save_quantized

__all__ = [
    *int4.__all__,
    "lowrank_quantize_act",
    "lowrank_w4a4_gemm",
    "lowrank_w4a4_linear",
    "lowrank_w4a16_linear",
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
    "sqnr_hooks",
]
