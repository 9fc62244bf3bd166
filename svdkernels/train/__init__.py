"""The trainer layer: low-rank gradient optimisers and training-time helpers.

- :class:`LowRankAdamW` (GaLore-family AdamW: ``svd``/``rsvd``/``dct``/``random``
  projectors, moments kept/rotated/reset, adaptive gap, int4 basis, staggered and
  batched refresh) and the presets :class:`GaLoreAdamW`, :class:`QGaLoreAdamW`,
  :class:`DCTAdamW`; :func:`lowrank_param_groups` builds their param groups.
- :func:`layerwise`: each parameter's step inside backward, its gradient freed at once,
  with gradient accumulation.
- :class:`Int8Linear`: Q-GaLore's INT8 weights, updated with stochastic rounding.
- Under FSDP2/DDP: :func:`sharded_state_dict` / :func:`load_sharded_state_dict` for
  ``torch.distributed.checkpoint`` (``train/distributed.py``).
- Training-time SVD methods: :class:`OrthogonalSubspace` (continual learning in
  orthogonal subspaces), :class:`LowRankSparseLinear` / :func:`lost_init` (LOST),
  :class:`RankDecay` (QVGen), :func:`fedsvd_aggregate` / :class:`FedSVD` (FedSVD with
  DP-SGD clients), :func:`balora_loss` (BA-LoRA's regularisers).

Built only from svdkernels ops and torch.
"""
from svdkernels.train.balora import balora_loss, consistency_loss, diversity_loss, svd_loss
from svdkernels.train.distributed import load_sharded_state_dict, sharded_state_dict
from svdkernels.train.fedsvd import (
    FedSVD,
    dirichlet_split,
    dp_gradients,
    fedsvd_aggregate,
    fedsvd_aggregate_dense,
    fedsvd_process,
)
from svdkernels.train.int8 import Int8Linear, dequantize_int8, quantize_int8
from svdkernels.train.layerwise import LayerwiseHandle, layerwise
from svdkernels.train.lost import LowRankSparseLinear, lost_init, lowrank_rank_at_same_params
from svdkernels.train.optim import (
    DCTAdamW,
    GaLoreAdamW,
    LowRankAdamW,
    QGaLoreAdamW,
    lowrank_param_groups,
)
from svdkernels.train.orthogonal import OrthogonalSubspace, project_off
from svdkernels.train.rank_decay import QVGenLinear, RankDecay, fake_quant_act, fake_quant_weight, thin_halve

__all__ = [
    "DCTAdamW",
    "FedSVD",
    "GaLoreAdamW",
    "Int8Linear",
    "LayerwiseHandle",
    "LowRankAdamW",
    "LowRankSparseLinear",
    "OrthogonalSubspace",
    "QGaLoreAdamW",
    "QVGenLinear",
    "RankDecay",
    "balora_loss",
    "consistency_loss",
    "dequantize_int8",
    "dirichlet_split",
    "diversity_loss",
    "dp_gradients",
    "fake_quant_act",
    "fake_quant_weight",
    "fedsvd_aggregate",
    "fedsvd_aggregate_dense",
    "fedsvd_process",
    "layerwise",
    "load_sharded_state_dict",
    "lost_init",
    "lowrank_param_groups",
    "lowrank_rank_at_same_params",
    "project_off",
    "quantize_int8",
    "sharded_state_dict",
    "svd_loss",
    "thin_halve",
]
