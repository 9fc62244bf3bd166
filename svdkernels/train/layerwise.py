"""Per-layer updates: each parameter's optimiser step inside the backward pass.

GaLore's "per-layer weight updates" (Zhao et al. 2024, section 4.3; Lv et al. 2023,
LOMO) step a parameter as soon as its gradient is complete and free that gradient at
once, so the gradients of the whole model never exist together. galore-torch does it
with one optimiser per parameter and no gradient accumulation; :func:`layerwise` does it
with the one :class:`LowRankAdamW` (state, schedulers and ``state_dict`` unchanged), with
the batched refresh of a shape group, and with accumulation over ``k`` micro-batches in
rank space.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from svdkernels.train import distributed as tdist
from svdkernels.train.int8 import is_int8_weight
from svdkernels.train.optim import LowRankAdamW
from svdkernels.train.projected_step import project_gradient

# (group, group index, index in group, parameter, gradient): the optimiser's item layout.
_Item = tuple[dict[str, Any], int, int, torch.Tensor, torch.Tensor]


class LayerwiseHandle:
    """What :func:`layerwise` returns: :meth:`remove` restores normal stepping.

    Attributes:
        refresh_deferred: how many parameter refreshes were put off to a later window
            because another shape group was being held (see :func:`layerwise`).
    """

    def __init__(self, optimizer: LowRankAdamW, accumulate: int) -> None:
        self.optimizer = optimizer
        self.accumulate = accumulate
        self.refresh_deferred = 0
        self._where: dict[torch.Tensor, tuple[dict[str, Any], int, int]] = {}
        self._members: dict[tuple, list[torch.Tensor]] = {}  # shape-group key -> its hooked params
        self._held: Optional[tuple] = None  # the one shape group whose gradients are held
        self._held_items: list[_Item] = []
        self._expected: set[int] = set()
        self._deferred: set[tuple] = set()  # keys put off in this backward pass
        self._queued = False
        self._handles: list[Any] = []
        self._int8: list[torch.Tensor] = []

    # ------------------------------------------------------------------ hooks

    def _hook(self, p: torch.Tensor) -> None:
        opt = self.optimizer
        g = opt._grad_of(p)
        if g is None:
            return
        group, gi, pi = self._where[p]
        item = (group, gi, pi, p, g)
        if not self._queued:  # flush a partly arrived group when the backward pass ends
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._queued = True
        try:
            with torch.no_grad():
                if opt._nonfinite([item]) is not None:
                    self._consume(item, finite=False)
                    self._expected.discard(id(p))  # a held group no longer waits for it
                    self._flush_if_complete()
                elif group["lowrank"] and self._due_now(group, p):
                    key = opt._key(group, p)
                    if key not in self._deferred and self._held in (None, key):
                        self._hold(key, item)
                        return
                    # Another shape group is held: holding this one too would grow the
                    # held gradients past one shape group. Step with the current basis and
                    # refresh in a later window; with no basis yet, refresh this one alone.
                    self._deferred.add(key)
                    if "next_refresh" in opt.state[p]:
                        self.refresh_deferred += 1
                    else:
                        opt._refresh([item])
                    self._consume(item)
                else:
                    self._consume(item)
        except BaseException:
            # This backward pass is abandoned: drop the gradients still held, or the next
            # backward would add its own onto them.
            for it in self._held_items:
                _free(it[3])
            self._reset()
            raise

    def _due_now(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        """Its basis is due and this is the first micro-batch of its window."""
        return self.optimizer.state[p].get("micro_batch", 0) == 0 and self.optimizer._due(group, p)

    def _hold(self, key: tuple, item: _Item) -> None:
        if self._held is None:
            self._held = key
            self._expected = {id(q) for q in self._members[key] if self._due_now(self._where[q][0], q)}
        self._held_items.append(item)
        self._flush_if_complete()

    def _flush_if_complete(self) -> None:
        if self._held is not None and self._expected <= {id(it[3]) for it in self._held_items}:
            self._flush()

    def _flush(self) -> None:
        """Refresh the held shape group with one batched call, then step each member."""
        if self._held is None:
            return
        opt = self.optimizer
        items = sorted(self._held_items, key=lambda it: opt._index[it[3]])  # the order step() batches in
        self._held, self._held_items, self._expected = None, [], set()
        with torch.no_grad():
            opt._refresh(items)
            for it in items:
                self._consume(it)

    def _end_of_backward(self) -> None:
        try:
            self._flush()  # members that got no gradient in this pass are not waited for
        finally:
            self._reset()

    def _reset(self) -> None:
        self._queued = False
        self._deferred.clear()
        self._held, self._held_items, self._expected = None, [], set()

    def _consume(self, item: _Item, finite: bool = True) -> None:
        """This micro-batch's gradient of one parameter: step (``accumulate == 1``), or add
        it to the window (a low-rank one projected into its rank-space sum, its full
        gradient freed) and step from the sum on the window's last micro-batch."""
        group, gi, pi, p, g = item
        opt = self.optimizer
        if not finite and not opt.skip_nonfinite:
            _free(p)  # else every later backward adds onto the NaN and raises again
            raise ValueError(f"parameter {opt._name(group, gi, pi, p)}: non-finite gradient (NaN or inf); "
                             f"pass skip_nonfinite=True to skip such steps")
        if self.accumulate == 1:
            if finite:
                opt._update(group, p, g)
            else:
                opt.skipped_steps += 1
            _free(p)
            return
        state = opt.state[p]
        n = state.get("micro_batch", 0) + 1
        if not finite:
            state["window_nonfinite"] = 1
        elif group["lowrank"] and not state.get("window_nonfinite"):  # a skipped window needs no sum
            R = project_gradient(g, opt._float_basis(group, p), opt.side_of(group, p))
            if "grad_acc" in state:
                state["grad_acc"].add_(R)
            else:
                state["grad_acc"] = R
        if group["lowrank"]:
            _free(p)  # the rank-space sum carries it (plain parameters accumulate in .grad)
        if n < self.accumulate:
            state["micro_batch"] = n
            return
        acc = state.pop("grad_acc", None)
        state.pop("micro_batch", None)
        if state.pop("window_nonfinite", 0):
            opt.skipped_steps += 1  # the whole window of this parameter: weights and moments untouched
        elif group["lowrank"]:
            opt._update(group, p, acc, projected=True)
        else:
            opt._update(group, p, g)
        _free(p)

    def remove(self) -> None:
        """Unregister every hook (then call ``optimizer.step()`` as usual again).

        Call it between windows: a window's rank-space sums (``grad_acc``) stay in the
        optimiser state, and ``step()`` does not read them."""
        for h in self._handles:
            h.remove()
        for p in self._int8:
            p._float_grad_hooks = [h for h in getattr(p, "_float_grad_hooks", []) if h != self._hook]
        self._handles.clear()
        self._int8.clear()
        self._reset()


def _free(p: torch.Tensor) -> None:
    # Freed here, inside backward: the next layer's gradient reuses the memory.
    if is_int8_weight(p):
        p.float_grad = None
    else:
        p.grad = None


def layerwise(model: nn.Module, optimizer: LowRankAdamW, *, accumulate: int = 1) -> LayerwiseHandle:
    """Step each parameter of ``optimizer`` in its post-accumulate-grad hook.

    After this call, ``loss.backward()`` *is* the optimiser step (on every ``accumulate``-th
    micro-batch; the others only accumulate gradients): do not call ``optimizer.step()``
    or ``zero_grad()``. LR schedulers keep working (they edit the param groups).

    **Batched refresh.** When a low-rank parameter's basis is due, its gradient is held
    until every due member of its shape group (same shape, side, rank, projector, as
    :meth:`LowRankAdamW.step` batches them) has arrived, or the backward pass ends; then
    the group is refreshed by one batched call (one ``rsvd``/SVD/DCT scoring per group,
    the same batch and seed as :meth:`~LowRankAdamW.step`) and each member steps. At most
    **one shape group's gradients are held at once**: a due parameter of another shape
    group that arrives while one is held steps with its current basis and is refreshed in
    a later window (:attr:`LayerwiseHandle.refresh_deferred` counts these), so shape
    groups that interleave across layers refresh on successive steps, as with
    ``stagger=True``. The exception is a parameter that has no basis yet (the very first
    step): it is refreshed alone.

    **Accumulation** (``accumulate=k > 1``) happens in rank space: each micro-batch's
    gradient of a low-rank parameter is projected with the current basis, added to a
    float32 sum ``grad_acc`` (``[m, r]`` or ``[r, n]``) in the optimiser state, and its
    full gradient is freed in the hook; the ``k``-th micro-batch steps from the sum
    (:func:`svdkernels.train.projected_step.projected_adam_step`). By linearity
    (``Σ Gᵢ·Pᵀ = (Σ Gᵢ)·Pᵀ``) this equals stepping on the summed gradient, up to float
    rounding. Plain (not low-rank) parameters accumulate their full gradients in
    ``.grad`` as usual. A mid-window ``state_dict`` holds the sums and the micro-batch
    counters (``micro_batch``); the plain parameters' partial ``.grad`` are not optimiser
    state.

    **Refresh with accumulation.** A basis that is due is refreshed on the window's
    *first* micro-batch, from that micro-batch's gradient, and every micro-batch of the
    window is projected into the new basis. The window's summed gradient would need all
    ``k`` full gradients at once (or a copy of one across the window), which is what this
    mode avoids; a refresh at the window's end would leave the earlier micro-batches
    projected into the old basis. A basis from one micro-batch is what GaLore itself
    uses at ``k = 1``. So on refresh windows, unlike the others, the result differs from
    ``step()`` on the summed gradient: it equals calling :meth:`~LowRankAdamW.refresh`
    after the first micro-batch's backward, then ``step()`` after the ``k``-th.

    Non-finite gradients: ``ValueError`` naming the parameter, raised from
    ``backward()``; with ``skip_nonfinite=True`` that parameter's window is skipped
    (its weights and moments untouched, :attr:`LowRankAdamW.skipped_steps` counts it).

    Args:
        model: the model whose backward pass drives the steps (its parameters must be
            the optimizer's).
        optimizer: a :class:`LowRankAdamW` (or preset); not under FSDP2 or with a
            ``process_group`` (their refresh is collective: call ``step()``).
        accumulate: micro-batches per step, ``k >= 1``.

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
    if optimizer.process_group is not None or any(tdist.is_sharded(p) for g in optimizer.param_groups
                                                  for p in g["params"]):
        raise ValueError("optimizer: layerwise steps are not supported for FSDP2 parameters or with a "
                         "process_group (the refresh is collective); got one of those, call step()")
    handle = LayerwiseHandle(optimizer, accumulate)
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if is_int8_weight(p):
                p._float_grad_hooks = list(getattr(p, "_float_grad_hooks", [])) + [handle._hook]
                handle._int8.append(p)
            elif p.requires_grad:
                handle._handles.append(p.register_post_accumulate_grad_hook(handle._hook))
            else:
                continue
            handle._where[p] = (group, gi, pi)
            if group["lowrank"]:
                handle._members.setdefault(optimizer._key(group, p), []).append(p)
    return handle
