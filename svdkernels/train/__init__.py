"""The trainer layer: low-rank gradient optimisers and training-time helpers.

- :class:`LowRankAdamW` (GaLore-family AdamW: ``svd``/``rsvd``/``dct``/``random``
  projectors, moments kept/rotated/reset, adaptive gap, int4 basis, staggered and
  batched refresh) and the presets :class:`GaLoreAdamW`, :class:`QGaLoreAdamW`,
  :class:`DCTAdamW`; :func:`lowrank_param_groups` builds their param groups.
- :func:`layerwise`: each parameter's step inside backward, its gradient freed at once,
  with gradient accumulation.
- :class:`Int8Linear`: Q-GaLore's INT8 weights, updated with stochastic rounding.

Built only from svdkernels ops and torch.
"""
from svdkernels.train.int8 import Int8Linear, dequantize_int8, quantize_int8
from svdkernels.train.layerwise import LayerwiseHandle, layerwise
from svdkernels.train.optim import (
    DCTAdamW,
    GaLoreAdamW,
    LowRankAdamW,
    QGaLoreAdamW,
    lowrank_param_groups,
)

__all__ = [
    "DCTAdamW",
    "GaLoreAdamW",
    "Int8Linear",
    "LayerwiseHandle",
    "LowRankAdamW",
    "QGaLoreAdamW",
    "dequantize_int8",
    "layerwise",
    "lowrank_param_groups",
    "quantize_int8",
]
