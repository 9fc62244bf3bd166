"""Per-layer updates: each parameter's optimiser step inside the backward pass.

GaLore's "per-layer weight updates" (Zhao et al. 2024, section 4.3; Lv et al. 2023,
LOMO) step a parameter as soon as its gradient is complete and free that gradient at
once, so the gradients of the whole model never exist together. galore-torch does it
with one optimiser per parameter and no gradient accumulation; :func:`layerwise` does it
with the one :class:`LowRankAdamW` (state, schedulers and ``state_dict`` unchanged) and
accumulation over ``k`` micro-batches.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from svdkernels.train.int8 import is_int8_weight
from svdkernels.train.optim import LowRankAdamW


class LayerwiseHandle:
    """What :func:`layerwise` returns: :meth:`remove` restores normal stepping."""

    def __init__(self, optimizer: LowRankAdamW, accumulate: int) -> None:
        self.optimizer = optimizer
        self.accumulate = accumulate
        self.micro_batches: dict[torch.Tensor, int] = {}
        self._handles: list[Any] = []
        self._int8: list[torch.Tensor] = []

    def _hook(self, p: torch.Tensor) -> None:
        n = self.micro_batches.get(p, 0) + 1
        self.micro_batches[p] = n
        if n % self.accumulate:
            return  # keep accumulating into p.grad
        self.optimizer.step_param(p)
        # Freed here, inside backward: the next layer's gradient reuses the memory.
        if is_int8_weight(p):
            p.float_grad = None
        else:
            p.grad = None

    def remove(self) -> None:
        """Unregister every hook (then call ``optimizer.step()`` as usual again)."""
        for h in self._handles:
            h.remove()
        for p in self._int8:
            p._float_grad_hooks = [h for h in getattr(p, "_float_grad_hooks", []) if h != self._hook]
        self._handles.clear()
        self._int8.clear()


def layerwise(model: nn.Module, optimizer: LowRankAdamW, *, accumulate: int = 1) -> LayerwiseHandle:
    """Step each parameter of ``optimizer`` in its post-accumulate-grad hook.

    After this call, ``loss.backward()`` *is* the optimiser step (on every ``accumulate``-th
    micro-batch; the others only accumulate gradients): do not call ``optimizer.step()``
    or ``zero_grad()``. LR schedulers keep working (they edit the param groups). Each
    parameter's basis is refreshed alone when due (the batched refresh needs the
    gradients of a whole shape group at once, which this mode never holds).

    Args:
        model: the model whose backward pass drives the steps (its parameters must be
            the optimizer's).
        optimizer: a :class:`LowRankAdamW` (or preset).
        accumulate: micro-batches per step, ``k >= 1``. With ``k > 1`` the gradients
            persist between micro-batches (as in any accumulation) and are freed at the
            ``k``-th, as each parameter steps.

    Example::

        opt = GaLoreAdamW(lowrank_param_groups(model, rank=128))
        handle = layerwise(model, opt, accumulate=4)
        for batch in loader:
            model(batch).loss.backward()   # steps every 4th micro-batch
    """
    if not isinstance(optimizer, LowRankAdamW):
        raise TypeError(f"optimizer: expected a LowRankAdamW (or a preset of it), got {type(optimizer).__name__}")
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate: expected an int >= 1, got {accumulate!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    model_params = {id(p) for p in model.parameters()}
    if not owned <= model_params:
        raise ValueError("optimizer: expected parameters of model, got some that model does not have")
    handle = LayerwiseHandle(optimizer, accumulate)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if is_int8_weight(p):
                p._float_grad_hooks = list(getattr(p, "_float_grad_hooks", [])) + [handle._hook]
                handle._int8.append(p)
            elif p.requires_grad:
                handle._handles.append(p.register_post_accumulate_grad_hook(handle._hook))
    return handle
