"""SoMA (Yun et al. 2025, "SoMA: Singular Value Decomposed Minor Components Adaptation
for Domain Generalizable Representation Learning").

Three parts:

- the adapter: MiLoRA's split of each weight's *minor* ``r`` singular components into a
  trainable ``B·A`` (``A = √S·Vᵀ``, ``B = U·√S``) with the principal residual frozen,
  so outputs are unchanged at initialisation: :func:`adapt_soma` (its layers are
  MiLoRA ``SVDLinear`` layers, so merge, ``save_adapter``/``load_adapter`` and peft
  export work unchanged);
- **frozen blocks**: the paper keeps the early, domain-generalisable blocks of the
  backbone frozen whole; :func:`soma_targets` gives the linear layers of the other
  blocks, for ``adapt(..., targets=soma_targets(model, freeze_blocks=k))`` (every
  parameter ``adapt`` does not adapt is frozen);
- **annealed weight decay**: :class:`AnnealedWeightDecay`, a schedule that writes each
  step's ``weight_decay`` into the optimiser's parameter groups (any optimiser that
  reads ``group["weight_decay"]``: AdamW, SGD, this library's LowRankAdamW). The paper
  anneals the decay over training without fixing the curve in its text; here it is a
  cosine from ``start`` to ``end`` (``end=0`` by default), or linear.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Optional, Union

import torch
from torch import nn

from svdkernels.adapters.adapt import adapt
from svdkernels.adapters.modules import Targets, find_linears
from svdkernels.errors import check_finite_number


def block_index(name: str) -> Optional[int]:
    """The block a module belongs to: the first all-digit component of its dotted name
    (``encoder.layer.3.attention.query`` → 3, ``layers.0.mlp`` → 0), or ``None``."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def soma_targets(model: nn.Module, freeze_blocks: Union[int, Iterable[int]] = 0,
                 targets: Targets = None) -> list[str]:
    """Names of the ``nn.Linear`` layers of ``model`` that SoMA adapts: those outside
    the frozen blocks (and selected by ``targets``, as :func:`svdkernels.adapt`'s).

    ``freeze_blocks``: an int ``k`` freezes blocks ``0..k−1`` (the early blocks, as the
    paper), or an iterable of block indices. Layers outside any numbered block (a
    head, an embedding projection) are kept. ``ValueError`` when nothing is left or
    an index names no block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    linears = list(find_linears(model, targets))
    blocks = sorted({b for n in linears if (b := block_index(n)) is not None})
    if isinstance(freeze_blocks, bool):
        raise TypeError(f"freeze_blocks: expected an int or block indices, got {freeze_blocks!r}")
    if isinstance(freeze_blocks, int):
        if not 0 <= freeze_blocks <= len(blocks):
            raise ValueError(f"freeze_blocks: expected 0 <= freeze_blocks <= {len(blocks)} (the model's numbered "
                             f"blocks {blocks}), got {freeze_blocks}")
        frozen = set(blocks[:freeze_blocks])
    else:
        frozen = set(freeze_blocks)
        unknown = sorted(frozen - set(blocks))
        if unknown:
            raise ValueError(f"freeze_blocks: expected indices among the model's blocks {blocks}, got {unknown}")
    keep = [n for n in linears if block_index(n) not in frozen]
    if not keep:
        raise ValueError(f"freeze_blocks: freezing {sorted(frozen)} leaves no linear layer to adapt")
    return keep


def adapt_soma(model: nn.Module, *, rank: int = 16, freeze_blocks: Union[int, Iterable[int]] = 0,
               targets: Targets = None, alpha: Optional[float] = None,
               modules_to_save: Optional[Union[str, list[str]]] = None) -> nn.Module:
    """SoMA's adapter on ``model`` in place: the linear layers outside the frozen blocks
    (:func:`soma_targets`) get MiLoRA's minor-component ``B·A`` of rank ``rank``;
    every other parameter (the frozen blocks whole) is frozen, except
    ``modules_to_save``. Returns ``model`` (see :func:`svdkernels.adapt`).
    Schedule the weight decay of the optimiser with :class:`AnnealedWeightDecay`."""
    names = soma_targets(model, freeze_blocks, targets)
    return adapt(model, "milora", rank=rank, targets=names, alpha=alpha, modules_to_save=modules_to_save)


class AnnealedWeightDecay:
    """SoMA's annealed weight decay: each :meth:`step` sets ``group["weight_decay"]`` of
    the chosen parameter groups to the schedule's value at the current step.

    Args:
        optimizer: any ``torch.optim.Optimizer`` whose step reads ``weight_decay``.
        start, end: the decay at step 0 and at ``total_steps`` (``>= 0``).
        total_steps: the schedule's length (``>= 1``); afterwards it stays at ``end``.
        schedule: ``"cosine"`` (``end + (start − end)·(1 + cos(π·t/T))/2``) or ``"linear"``.
        groups: indices of the parameter groups to schedule (default: all).

    Call :meth:`step` once per optimiser step (after it, like an LR scheduler); the
    value for step 0 is set at construction. :meth:`state_dict` /
    :meth:`load_state_dict` save and restore the position.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, start: float, end: float = 0.0, total_steps: int,
                 schedule: str = "cosine", groups: Optional[Iterable[int]] = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.start = check_finite_number("start", start, low=0.0)
        self.end = check_finite_number("end", end, low=0.0)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps: expected an int >= 1, got {total_steps!r}")
        if schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule: expected 'cosine' or 'linear', got {schedule!r}")
        n = len(optimizer.param_groups)
        if groups is not None and (isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable)):
            raise TypeError(f"groups: expected None or indices of the optimiser's parameter groups, got {groups!r}")
        self.groups = list(range(n)) if groups is None else list(groups)
        bad = [g for g in self.groups if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < n]
        if bad:
            raise ValueError(f"groups: expected indices in [0, {n}) of the optimiser's parameter groups, got {bad}")
        for g in self.groups:
            if "weight_decay" not in optimizer.param_groups[g]:
                raise ValueError(f"optimizer: parameter group {g} has no 'weight_decay' for the schedule to set "
                                 f"(a {type(optimizer).__name__})")
        self.optimizer, self.total_steps, self.schedule = optimizer, total_steps, schedule
        self.step_count = 0
        self._apply()

    def value(self, step: Optional[int] = None) -> float:
        """The weight decay at ``step`` (default: the current step)."""
        t = min(self.step_count if step is None else step, self.total_steps) / self.total_steps
        frac = 0.5 * (1 + math.cos(math.pi * t)) if self.schedule == "cosine" else 1 - t
        return self.end + (self.start - self.end) * frac

    def _apply(self) -> None:
        wd = self.value()
        for g in self.groups:
            self.optimizer.param_groups[g]["weight_decay"] = wd

    def step(self) -> float:
        """Advance one step and write the new decay into the optimiser; returns it."""
        self.step_count += 1
        self._apply()
        return self.value()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        count = state.get("step_count") if isinstance(state, dict) else None
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"state: expected {{'step_count': an int >= 0}} (from state_dict()), got {state!r}")
        self.step_count = count
        self._apply()
