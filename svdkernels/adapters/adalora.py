"""AdaLoRA's rank budget (Zhang et al. 2023) for ``adapt(model, "adalora")`` layers.

Each triplet ``i`` of a layer (``A[i, :]``, ``E[i]``, ``B[:, i]``) gets an importance
score from the sensitivity ``s = |w·∇w|`` of its entries, smoothed
``Ī ← β₁Ī + (1−β₁)s`` with uncertainty ``Ū ← β₂Ū + (1−β₂)|s − Ī|``, score ``Ī·Ū``
(means over ``A``'s row and ``B``'s column, summed with ``E``'s). The total budget
follows the cubic schedule ``b(t) = b_T + (b_0 − b_T)(1 − (t−t_i)/(T−t_f−t_i))³``;
every ``delta_t`` steps the lowest-scoring triplets across all layers are masked
(``rank_mask`` False, ``E`` zeroed), as peft's ``RankAllocator`` does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from svdkernels.adapters.svd_linear import SVDLinear
from svdkernels.errors import check_finite_number, strict_kwargs


class AdaLoRABudget:
    """Call :meth:`step` after ``loss.backward()`` and before ``optimizer.zero_grad()``.

    Args:
        model: a model adapted with ``svdkernels.adapt(model, "adalora", rank=r0)``.
        target_rank: mean rank per layer at the end (total budget ``target_rank·L``).
        total_steps: ``T``, the number of training steps.
        tinit, tfinal: warm-up steps at the full budget and final steps at the target.
        delta_t: steps between two maskings during the schedule.
        beta1, beta2: the smoothing of importance and uncertainty (0.85, as the paper).
    """

    @strict_kwargs
    def __init__(self, model: nn.Module, *, target_rank: int, total_steps: int, tinit: int = 0, tfinal: int = 0,
                 delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        for name, v in (("target_rank", target_rank), ("total_steps", total_steps), ("tinit", tinit),
                        ("tfinal", tfinal), ("delta_t", delta_t)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected an int, got {v!r}")
            if v < (1 if name in ("total_steps", "delta_t") else 0):
                raise ValueError(f"{name}: expected an int >= {1 if name in ('total_steps', 'delta_t') else 0}, "
                                 f"got {v}")
        check_finite_number("beta1", beta1, low=0.0, high=1.0)
        check_finite_number("beta2", beta2, low=0.0, high=1.0)
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear) and m.method == "adalora"}
        if not self.layers:
            raise ValueError("model: expected layers adapted with method 'adalora', found none")
        if total_steps <= tinit + tfinal:
            raise ValueError(f"total_steps: expected more than tinit + tfinal = {tinit + tfinal}, got {total_steps}")
        self.init_budget = sum(m.rank for m in self.layers.values())
        self.target_budget = target_rank * len(self.layers)
        if not 0 < self.target_budget <= self.init_budget:
            raise ValueError(f"target_rank: expected 1 <= target_rank <= the initial rank, got {target_rank}")
        self.total_steps, self.tinit, self.tfinal, self.delta_t = total_steps, tinit, tfinal, delta_t
        self.beta1, self.beta2 = beta1, beta2
        self._ipt: dict[int, torch.Tensor] = {}
        self._unc: dict[int, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """``(budget, mask now)`` at ``step`` (the schedule of the class docstring)."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.total_steps - self.tfinal:
            return self.target_budget, True
        frac = 1 - (step - self.tinit) / (self.total_steps - self.tfinal - self.tinit)
        b = int((self.init_budget - self.target_budget) * frac**3 + self.target_budget)
        return b, step % self.delta_t == 0

    @torch.no_grad()
    def _score(self, p: torch.Tensor) -> torch.Tensor:
        s = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
        key = id(p)
        ipt = self._ipt.get(key, torch.zeros_like(p))
        unc = self._unc.get(key, torch.zeros_like(p))
        ipt = self.beta1 * ipt + (1 - self.beta1) * s
        unc = self.beta2 * unc + (1 - self.beta2) * (s - ipt).abs()
        self._ipt[key], self._unc[key] = ipt, unc
        return ipt * unc

    @torch.no_grad()
    def step(self, step: int) -> Optional[int]:
        """Update the importance scores; mask to the budget when the schedule says so.
        Returns the budget applied, or ``None`` when nothing was masked."""
        scores = {}
        for name, m in self.layers.items():
            scores[name] = (self._score(m.lora_E) + self._score(m.lora_A).mean(1)
                            + self._score(m.lora_B).mean(0))
        budget, mask_now = self.budget(step)
        if not mask_now:
            return None
        flat = torch.cat(list(scores.values()))
        n_prune = self.init_budget - budget
        threshold = torch.kthvalue(flat, n_prune).values if n_prune > 0 else flat.min() - 1
        for name, m in self.layers.items():
            keep = scores[name] > threshold
            m.rank_mask.copy_(keep)
            m.lora_E.masked_fill_(~keep, 0.0)
        return budget

    def ranks(self) -> dict[str, int]:
        """The current rank (unmasked triplets) of every layer."""
        return {n: int(m.rank_mask.sum()) for n, m in self.layers.items()}
