"""Adapter layers built on svdkernels ops (a layer never contains a kernel).

- :func:`adapt`: wrap a model's linear layers in an SVD adapter (lora, pissa, milora,
  svfit, clip_svd, sorsa, salt, kasa, corda, eva, nlora, effort, adalora, soka),
  initialised with one batched factorisation per shape group;
- :class:`SVDLinear`: the adapter layer of the SVD family (thin products, never the
  dense weight); :func:`regularization_loss`, :class:`AdaLoRABudget`;
- :func:`save_adapter` / :func:`load_adapter` (safetensors), :func:`export_peft_lora`;
- :class:`KronLinear`: Kronecker adapters (SoKA init from the KPSVD, LoKr init),
  forward and backward through ``kron_linear``;
- :func:`load_lokr` / :func:`save_lokr`: peft LoKr adapters in and out of KronLinear;
- KIND (:class:`KindLinear`, :func:`kind_adapt`, :func:`kind_classes`,
  :func:`extract_learngenes`, :func:`save_kind` / :func:`load_kind`): shared learngenes and
  class-gated tailors; SoMA (:func:`adapt_soma`, :func:`soma_targets`,
  :class:`AnnealedWeightDecay`);
- on an FSDP2-sharded model, :func:`adapt` runs the methods in
  ``svdkernels.adapters.sharded.SHARDED_METHODS`` with the sharded rsvd (not imported
  here: it loads ``torch.distributed.tensor``).
"""
from svdkernels.adapters.adalora import AdaLoRABudget
from svdkernels.adapters.adapt import (
    ALL_METHODS,
    adapt,
    adapter_layers,
    mark_only_adapter_trainable,
    regularization_loss,
)
from svdkernels.adapters.kind import (
    KindLinear,
    extract_learngenes,
    kind_adapt,
    kind_classes,
    load_kind,
    save_kind,
)
from svdkernels.adapters.kron import KronLinear, near_square_factors
from svdkernels.adapters.lokr import load_lokr, save_lokr
from svdkernels.adapters.soma import AnnealedWeightDecay, adapt_soma, soma_targets
from svdkernels.adapters.state import export_peft_lora, load_adapter, save_adapter
from svdkernels.adapters.svd_linear import SVDLinear

__all__ = [
    "ALL_METHODS", "AdaLoRABudget", "AnnealedWeightDecay", "KindLinear", "KronLinear",
    "SVDLinear", "adapt", "adapt_soma", "adapter_layers", "export_peft_lora", "extract_learngenes",
    "kind_adapt", "kind_classes", "load_adapter", "load_kind", "load_lokr", "mark_only_adapter_trainable",
    "near_square_factors", "regularization_loss", "save_adapter", "save_kind", "save_lokr", "soma_targets",
]
