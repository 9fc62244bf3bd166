"""Continual full fine-tuning in orthogonal subspaces.

Nayak et al. 2025, "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for
Continual Learning" (peft calls its version OSF). At the start of each task the
high-rank directions of every target weight ``W [m, n]`` (its top singular vectors
``U_h [m, k]``, ``V_h [n, k]``) are frozen; during the task every gradient is
projected off them,

    G ← G − U_h(U_hᵀG) − (G·V_h)V_hᵀ + U_h(U_hᵀ·G·V_h)V_hᵀ   = (I − U_hU_hᵀ) G (I − V_hV_hᵀ),

so an SGD-type step never changes ``U_hᵀ W`` nor ``W V_h``. The projection uses thin
products only (``[k, n]``, ``[m, k]`` and ``[k, k]`` intermediates, never an ``m×m`` or
``n×n`` projector) and runs in a post-accumulate-grad hook, so any optimiser sees the
projected gradient (``torch.optim`` ones, :class:`~svdkernels.train.LowRankAdamW`,
:func:`~svdkernels.train.layerwise` — create the :class:`OrthogonalSubspace` *before*
``layerwise`` so that its hook runs first).

Optimisers that rescale gradients elementwise (Adam) or decay weights move the
frozen directions a little even with projected gradients; ``begin_task(optimizer=...)``
then also guards the step: the frozen components ``(U_hᵀW, W V_h)`` are recorded before
each ``optimizer.step()`` and restored after it (thin products again, ``k(m + n)``
floats per weight), so the frozen directions are exact for every optimiser.

Choices where the paper leaves one (documented here, tested):

- **Which directions.** Frozen directions accumulate across tasks: task ``t`` adds the
  top directions of ``(I − U_hU_hᵀ) W (I − V_hV_hᵀ)`` (the weight with the earlier tasks'
  directions removed), so the new ``U_h``/``V_h`` stay orthonormal and contain the old.
  One ``torch.linalg.svd`` per shape group (stacked ``[B, m, n]``), exact: the frozen
  basis must hold exactly the top directions, and the randomized SVD's error is largest
  precisely where pre-trained weights are (MiniLM's weights are near full rank, with
  flat spectra, REFERENCES.md); the SVD runs once per task, off the training step.
- **How many (``importance="io_similarity"``).** The paper takes layer importance from
  the cosine similarity of a layer's input and output on calibration data (after
  AdaSVD). We measure ``s_l = mean_tokens cos(x_in, x_out)`` of the nearest module around
  each target whose input and output have the same shape (the linear itself if square,
  else its enclosing block, e.g. a transformer layer), take importance
  ``I_l = 1 − s_l`` (a layer that changes its input more does more work and keeps more),
  normalise ``Î_l = I_l / mean(I)`` and freeze the fraction
  ``min_fraction + Î_l·(rank_fraction − min_fraction)`` (clamped to ``[0, max_fraction]``)
  of ``min(m, n)``; the mean frozen fraction per task is then ``rank_fraction``. A target
  with no same-shape module around it gets ``Î = 1`` (the mean).
  ``importance="uniform"`` freezes ``rank_fraction`` everywhere and needs no data.
- At most ``max_fraction`` of each weight's rank is ever frozen (default 0.9), so every
  layer keeps trainable directions.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from svdkernels.calibration import eval_mode, run_batches
from svdkernels.errors import check_finite_number
from svdkernels.quant.model import Targets, select_layers
from svdkernels.train.checks import check_finite_weights

IMPORTANCE_RULES = ("io_similarity", "uniform")


def project_off(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``(I − U Uᵀ) G (I − V Vᵀ)`` with thin products, in place on ``G``.

    Args:
        G: ``[m, n]`` gradient.
        U: ``[m, k]``, ``V``: ``[n, k]``, orthonormal columns (``k`` may be 0).
    """
    if U.shape[1] == 0:
        return G
    A = U.mT @ G  # [k, n]
    GV = G @ V  # [m, k]
    C = A @ V  # [k, k]
    G.sub_(U @ A).sub_((GV - U @ C) @ V.mT)
    return G


def frozen_components(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Uᵀ W [k, n], W V [m, k])``: what the frozen directions of ``W`` are."""
    return U.mT @ W, W @ V


def _io_similarity(model: nn.Module, names: list[str], calib_batches: Iterable[Any]) -> dict[str, float]:
    """Mean token cosine of input and output of each target's nearest same-shape module."""
    modules = dict(model.named_modules())
    sums: dict[str, list[float]] = {}
    handles = []

    def first_tensor(obj: Any) -> Optional[torch.Tensor]:
        if isinstance(obj, torch.Tensor):
            return obj
        if isinstance(obj, (tuple, list)):
            for o in obj:
                t = first_tensor(o)
                if t is not None:
                    return t
        if isinstance(obj, dict):
            for o in obj.values():
                t = first_tensor(o)
                if t is not None:
                    return t
        return None

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = first_tensor(args)
            if x is None:
                x = first_tensor(kwargs)
            y = first_tensor(out)
            if x is None or y is None or x.shape != y.shape or not x.is_floating_point():
                return
            cos = torch.nn.functional.cosine_similarity(x.detach().float(), y.detach().float(), dim=-1)
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(cos.sum())
            acc[1] += cos.numel()
        return fn

    chains: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        chains[n] = [".".join(parts[:i]) for i in range(len(parts), -1, -1)]  # self .. root ("")
    for mname in {m for c in chains.values() for m in c}:
        handles.append(modules[mname].register_forward_hook(hook(mname), with_kwargs=True))
    try:
        with eval_mode(model), torch.no_grad():
            run_batches(model, calib_batches)
    except (RuntimeError, TypeError) as e:
        if isinstance(e, TypeError) and str(e).startswith("calib_batches"):
            raise
        # A batch the model cannot take (wrong width, None...): say which argument it came from.
        raise ValueError(f"calib_batches: expected inputs the model accepts, got a batch on which it raised "
                         f"{type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, chain in chains.items():
        found = next((m for m in chain if m in sums and sums[m][1] > 0), None)
        if found is not None:
            out[n] = sums[found][0] / sums[found][1]
    return out


class OrthogonalSubspace:
    """Continual full fine-tuning with each task's gradients orthogonal to the earlier
    tasks' high-rank weight directions (Sculpting Subspaces / OSF; module docstring).

    Args:
        model: any module; its target ``nn.Linear`` weights are constrained, in place
            (nothing is replaced: the model stays a plain model, merge is a no-op).
        targets: ``None`` (all ``nn.Linear``), a regex (``re.fullmatch`` on the name) or
            a list of names / dotted suffixes.
        rank_fraction: mean fraction of each weight's rank ``min(m, n)`` frozen per task,
            in ``(0, 1)``.
        importance: ``"io_similarity"`` (the paper's rule; needs ``calib_batches`` in
            :meth:`begin_task`) or ``"uniform"``.
        min_fraction: the rule's floor (``mrr`` in the paper), ``0 <= min_fraction <= rank_fraction``.
        max_fraction: the most of a weight's rank ever frozen, in ``(0, 1]``.

    Use::

        osf = OrthogonalSubspace(model, rank_fraction=0.25)
        for task in tasks:
            osf.begin_task(calib_batches, optimizer=opt)   # first task: nothing is frozen yet
            train(model, task)
            osf.end_task()                                 # this task's directions freeze next
    """

    def __init__(self, model: nn.Module, targets: Targets = None, rank_fraction: float = 0.25,
                 importance: str = "io_similarity", *, min_fraction: float = 0.0,
                 max_fraction: float = 0.9) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.rank_fraction = check_finite_number("rank_fraction", rank_fraction, low=0.0, low_inclusive=False,
                                                 high=1.0)
        if self.rank_fraction >= 1.0:
            raise ValueError(f"rank_fraction: expected a number in (0, 1), got {rank_fraction!r}")
        if importance not in IMPORTANCE_RULES:
            raise ValueError(f"importance: expected one of {IMPORTANCE_RULES}, got {importance!r}")
        self.min_fraction = check_finite_number("min_fraction", min_fraction, low=0.0, high=self.rank_fraction)
        self.max_fraction = check_finite_number("max_fraction", max_fraction, low=0.0, low_inclusive=False,
                                                high=1.0)
        self.model = model
        self.importance = importance
        self.layers = select_layers(model, targets)
        ref = next(iter(self.layers.values())).weight
        # Frozen bases per target, [m, k] and [n, k]; k = 0 before the first end_task.
        self.U = {n: ref.new_zeros(l.weight.shape[0], 0) for n, l in self.layers.items()}
        self.V = {n: ref.new_zeros(l.weight.shape[1], 0) for n, l in self.layers.items()}
        self.task = 0
        self.active = False
        self.last_fractions: dict[str, float] = {}
        self._hooks: list[Any] = []
        self._opt_hooks: list[Any] = []
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ tasks

    def frozen_rank(self) -> dict[str, int]:
        """``{target: k}``, the number of frozen directions of each weight."""
        return {n: U.shape[1] for n, U in self.U.items()}

    def begin_task(self, calib_batches: Optional[Iterable[Any]] = None, *, optimizer: Any = None) -> None:
        """Start a task: freeze the directions of the tasks seen so far (none before the
        first task's :meth:`end_task`) and project every target gradient off them.

        Args:
            calib_batches: model inputs for the ``io_similarity`` rule (required from the
                second task on, when directions are chosen); ignored by ``"uniform"``.
            optimizer: optional; its steps are guarded so the frozen components are
                restored exactly after each step (needed for Adam-type optimisers or
                weight decay; SGD without weight decay is exact without it).
        """
        if self.active:
            raise ValueError("begin_task: expected end_task() of the current task first, got a task in progress")
        if optimizer is not None and not hasattr(optimizer, "register_step_pre_hook"):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self.task > 0:
            self._grow(calib_batches)
        for n, layer in self.layers.items():
            self._hooks.append(layer.weight.register_post_accumulate_grad_hook(self._grad_hook(n)))
        if optimizer is not None:
            self._opt_hooks = [optimizer.register_step_pre_hook(self._save_frozen),
                               optimizer.register_step_post_hook(self._restore_frozen)]
        self.active = True

    def end_task(self) -> None:
        """End the current task: remove the hooks; the next :meth:`begin_task` adds
        this task's high-rank directions to the frozen set."""
        if not self.active:
            raise ValueError("end_task: expected begin_task() first, got no task in progress")
        for h in self._hooks + self._opt_hooks:
            h.remove()
        self._hooks, self._opt_hooks = [], []
        self.active = False
        self.task += 1

    def remove(self) -> None:
        """Remove every hook (the model trains unconstrained afterwards)."""
        for h in self._hooks + self._opt_hooks:
            h.remove()
        self._hooks, self._opt_hooks = [], []
        self.active = False

    # ------------------------------------------------------------------ internals

    def _fractions(self, calib_batches: Optional[Iterable[Any]]) -> dict[str, float]:
        names = list(self.layers)
        if self.importance == "uniform":
            return {n: self.rank_fraction for n in names}
        if calib_batches is None:
            raise ValueError("calib_batches: expected model inputs for importance='io_similarity' "
                             "(the layer-importance rule), got None")
        sim = _io_similarity(self.model, names, calib_batches)
        imp = {n: max(1.0 - s, 0.0) for n, s in sim.items()}
        mean = sum(imp.values()) / len(imp) if imp else 0.0
        # A target with no same-shape module around it (or all importances zero) gets the mean: Î = 1.
        rel = {n: imp[n] / mean if mean > 0 and n in imp else 1.0 for n in names}
        return {n: min(max(self.min_fraction + rel[n] * (self.rank_fraction - self.min_fraction), 0.0),
                       self.max_fraction) for n in names}

    @torch.no_grad()
    def _grow(self, calib_batches: Optional[Iterable[Any]]) -> None:
        check_finite_weights(self.layers)  # the SVD below fails on NaN/inf (LinAlgError)
        fractions = self._fractions(calib_batches)
        self.last_fractions = fractions
        groups: dict[tuple, list[str]] = {}
        for n, layer in self.layers.items():
            groups.setdefault((tuple(layer.weight.shape), layer.weight.dtype, layer.weight.device), []).append(n)
        for (shape, _, _), names in groups.items():
            m, n_in = shape
            full = min(m, n_in)
            # Each weight with the earlier tasks' directions removed (thin products; ranks may
            # differ within a group): its top directions are the new ones.
            W = torch.stack([project_off(self.layers[n].weight.detach().float().clone(), self.U[n].float(),
                                         self.V[n].float()) for n in names])
            Us, _, Vh = torch.linalg.svd(W, full_matrices=False)  # one batched SVD per shape group
            for i, n in enumerate(names):
                have = self.U[n].shape[1]
                cap = math.floor(self.max_fraction * full)
                add = max(min(round(fractions[n] * full), cap - have), 0)
                dt = self.layers[n].weight.dtype
                self.U[n] = torch.cat([self.U[n], Us[i, :, :add].to(dt)], 1)
                self.V[n] = torch.cat([self.V[n], Vh[i, :add].mT.to(dt)], 1)

    def _grad_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                project_off(p.grad, self.U[name], self.V[name])
        return hook

    @torch.no_grad()
    def _save_frozen(self, *_: Any) -> None:
        self._saved = {n: frozen_components(l.weight, self.U[n], self.V[n])
                       for n, l in self.layers.items() if self.U[n].shape[1]}

    @torch.no_grad()
    def _restore_frozen(self, *_: Any) -> None:
        # W ← W + U(A₀ − A) + (B₀ − B)Vᵀ − U(C₀ − C)Vᵀ restores UᵀW = A₀ and W V = B₀ (C = UᵀWV).
        for n, (A0, B0) in self._saved.items():
            W, U, V = self.layers[n].weight, self.U[n], self.V[n]
            dA = A0 - U.mT @ W
            dB = B0 - W @ V
            dC = dA @ V
            W.add_(U @ dA).add_((dB - U @ dC) @ V.mT)
        self._saved = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen bases, ``{"<target>.U": [m, k], "<target>.V": [n, k]}`` (safetensors-ready)."""
        out = {}
        for n in self.layers:
            out[f"{n}.U"] = self.U[n].contiguous()
            out[f"{n}.V"] = self.V[n].contiguous()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load bases saved by :meth:`state_dict` (e.g. with ``safetensors.torch.load_file``)."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict of tensors (from state_dict()), got {type(state).__name__}")
        want = {f"{n}.{s}" for n in self.layers for s in "UV"}
        if set(state) != want:
            raise ValueError(f"state: expected keys {sorted(want)}, got {sorted(state)}")
        for n, layer in self.layers.items():
            U, V = state[f"{n}.U"], state[f"{n}.V"]
            if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (U, V)):
                raise TypeError(f"state: expected floating-point tensors {n}.U and {n}.V, got "
                                f"{type(U).__name__} and {type(V).__name__}")
            m, n_in = layer.weight.shape
            if U.dim() == 2 and U.shape[1] > min(m, n_in):
                raise ValueError(f"state: expected at most min(m, n) = {min(m, n_in)} frozen directions for {n}, "
                                 f"got {U.shape[1]}")
            if not (bool(torch.isfinite(U).all()) and bool(torch.isfinite(V).all())):
                # NaN bases would make every projected gradient NaN
                raise ValueError(f"state: expected finite {n}.U and {n}.V, got NaN or inf")
            if U.dim() != 2 or V.dim() != 2 or U.shape[0] != m or V.shape[0] != n_in or U.shape[1] != V.shape[1]:
                raise ValueError(f"state: expected {n}.U [{m}, k] and {n}.V [{n_in}, k], got "
                                 f"{tuple(U.shape)} and {tuple(V.shape)}")
        for n, layer in self.layers.items():  # all checked first: a refused state changes nothing
            self.U[n], self.V[n] = state[f"{n}.U"].to(layer.weight), state[f"{n}.V"].to(layer.weight)
