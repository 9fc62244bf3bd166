"""QVGen rank decay: quantisation-aware training with an auxiliary low-rank branch
that is annealed away.

QVGen (Huang et al. 2025, "QVGen: Pushing the Limit of Quantized Video Generative
Models") trains W4A4 models with an auxiliary ``Φ = L·R`` beside each fake-quantised
linear, initialised from the SVD of the weight's quantisation residual ``W − Q(W)``, so
that ``Q(x)·Q(W)ᵀ + x·Φᵀ ≈ x·Wᵀ`` at the start. Every ``every`` steps the rank of ``Φ``
halves, keeping the top half of ``Φ``'s own SVD; the removed half is not cut at once but
fades out with a cosine weight ``½(1 + cos(π·s/every))`` over the next ``every`` steps.
When the halved rank would fall below 2, all of ``Φ`` fades and is then removed: the
trained model is a plain W4A4 model with no extra inference cost
(:meth:`RankDecay.to_quantized` converts it to :class:`~svdkernels.quant.LowRankQuantLinear`
with rank 0, the real int4 kernels).

The reference code re-SVDs the full ``d_out×d_in`` product ``L·R`` at each halving; here
it is thin and exact: ``L = Q_L·R_L``, ``Rᵀ = Q_R·R_R`` (QR), the ``r×r`` SVD
``R_L·R_Rᵀ = u·diag(s)·vᵀ``, and ``L·R = (Q_L u)·diag(s)·(Q_R v)ᵀ`` (one batched call per
shape group).

Fake quantisation uses :mod:`svdkernels.quant`'s int4 formats (weights symmetric int4,
group 64; activations signed int4 per token and group of 64, as round-to-nearest W4A4
does), with a straight-through estimator: the gradient of ``Q(t)`` is taken as that of ``t``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import torch
from torch import nn

from svdkernels.errors import FormatError
from svdkernels.formats.int4 import GROUP_SIZE
from svdkernels.quant import LowRankQuantLinear, dequantize_act, dequantize_weight, quantize_act, quantize_weight
from svdkernels.quant.model import Targets, select_layers
from svdkernels.train.checks import check_finite_weights


def fake_quant_weight(W: torch.Tensor) -> torch.Tensor:
    """``Q(W)`` (int4, group 64) with a straight-through gradient; ``W [N, K]``, ``K % 64 == 0``."""
    with torch.no_grad():
        Wq = dequantize_weight(*quantize_weight(W.detach()), dtype=W.dtype)
    return W + (Wq - W).detach()


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """``Q(x)`` (signed int4 per token and group of 64) with a straight-through gradient."""
    with torch.no_grad():
        xq = dequantize_act(*quantize_act(x.detach()), dtype=x.dtype)
    return x + (xq - x).detach()


def thin_halve(L: torch.Tensor, R: torch.Tensor, keep: int) -> tuple[torch.Tensor, ...]:
    """Split ``Φ = L·R`` into its top-``keep`` SVD components and the rest, without an ``m×n`` SVD.

    Args:
        L: ``[..., m, r]``; R: ``[..., r, n]``; ``0 <= keep <= r``.

    Returns:
        ``(L_keep [..., m, keep], R_keep [..., keep, n], L_rest [..., m, r-keep], R_rest [..., r-keep, n])``,
        balanced (``√s`` on both sides); ``L_keep·R_keep + L_rest·R_rest = L·R``.
    """
    Ql, Rl = torch.linalg.qr(L)  # [m, r], [r, r]
    Qr, Rr = torch.linalg.qr(R.mT)  # [n, r], [r, r]
    u, s, vh = torch.linalg.svd(Rl @ Rr.mT)  # r×r
    root = s.sqrt()
    Lf = Ql @ (u * root[..., None, :])
    Rf = (root[..., :, None] * vh) @ Qr.mT
    return Lf[..., :keep], Rf[..., :keep, :], Lf[..., keep:], Rf[..., keep:, :]


class QVGenLinear(nn.Module):
    """A fake-quantised W4A4 linear with QVGen's auxiliary branch:
    ``y = Q(x)·Q(W)ᵀ + b + (x·Rᵀ)·Lᵀ + w_fade·(x·R_fadeᵀ)·L_fadeᵀ``.

    ``weight [out, in]`` (``in`` a multiple of 64), ``bias [out]``, ``L [out, r]``,
    ``R [r, in]`` are trained; ``fade_L [out, f]``, ``fade_R [f, in]`` and ``fade_weight``
    (a scalar) are buffers. ``r = 0`` and ``f = 0`` mean no branch (no extra compute).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if in_features % GROUP_SIZE:
            raise ValueError(f"in_features: expected a multiple of {GROUP_SIZE} (int4 groups), got {in_features}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.L = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.R = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.register_buffer("fade_L", torch.zeros(out_features, 0, **kw))
        self.register_buffer("fade_R", torch.zeros(0, in_features, **kw))
        self.register_buffer("fade_weight", torch.zeros((), **kw))

    @property
    def rank(self) -> int:
        return self.L.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
        y = fake_quant_act(x) @ fake_quant_weight(self.weight).mT
        if self.bias is not None:
            y = y + self.bias
        if self.rank:
            y = y + (x @ self.R.mT) @ self.L.mT
        if self.fade_L.shape[1]:
            y = y + self.fade_weight * ((x @ self.fade_R.mT) @ self.fade_L.mT)
        return y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Ranks change during training: take the file's, after checking they are consistent.
        L, R = state_dict.get(prefix + "L"), state_dict.get(prefix + "R")
        fL, fR = state_dict.get(prefix + "fade_L"), state_dict.get(prefix + "fade_R")
        for a, b, what in ((L, R, ""), (fL, fR, "fade_")):
            if a is None or b is None:
                continue
            if (a.dim() != 2 or b.dim() != 2 or a.shape[0] != self.out_features or b.shape[1] != self.in_features
                    or a.shape[1] != b.shape[0]):
                raise ValueError(f"{prefix}{what}L, {prefix}{what}R: expected [{self.out_features}, r] and "
                                 f"[r, {self.in_features}], got {tuple(a.shape)} and {tuple(b.shape)}")
            if what:
                self.fade_L, self.fade_R = torch.empty_like(a, dtype=self.weight.dtype), torch.empty_like(
                    b, dtype=self.weight.dtype)
            else:
                self.L = nn.Parameter(self.L.new_empty(a.shape))
                self.R = nn.Parameter(self.R.new_empty(b.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"fading={self.fade_L.shape[1]}, W4A4 fake-quant")


def _replace_param(layer: nn.Module, attr: str, value: torch.Tensor, optimizer: Any) -> None:
    """A new Parameter of another shape for ``layer.attr``; the optimiser (if any) gets it in
    the old one's place, with the old one's state dropped (autograd caches shapes per
    Parameter, so resizing ``.data`` in place is not an option)."""
    old = getattr(layer, attr)
    new = nn.Parameter(value.detach().clone().contiguous(), requires_grad=old.requires_grad)
    setattr(layer, attr, new)
    if optimizer is None:
        return
    optimizer.state.pop(old, None)
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]


def _check_pos_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value}")
    return value


class RankDecay:
    """QVGen's rank-decay schedule over the fake-quantised W4A4 linears of a model.

    Args:
        model: its target ``nn.Linear`` layers (``in_features`` a multiple of 64) are
            replaced in place by :class:`QVGenLinear` with ``Φ`` from the SVD of
            ``W − Q(W)`` at ``start_rank`` (one batched SVD per shape group).
        start_rank: initial rank of ``Φ`` (``1 <= start_rank <= min(out, in)``).
        every: steps between halvings (and the length of each fade).
        targets: ``None`` (all ``nn.Linear``), a regex or a list of names / suffixes.

    Call :meth:`step` once per optimiser step (pass the optimiser so the state of
    resized factors is dropped). After ``every·(max(1, ⌊log2(start_rank)⌋) + 1)`` steps
    (:attr:`total_steps`) ``Φ`` is gone everywhere (:attr:`finished`).
    """

    def __init__(self, model: nn.Module, start_rank: int = 32, every: int = 200, *, targets: Targets = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.start_rank = _check_pos_int("start_rank", start_rank)
        self.every = _check_pos_int("every", every)
        layers = select_layers(model, targets)
        if "" in layers:
            raise TypeError("model: expected a module containing nn.Linear layers, got a bare nn.Linear")
        for name, layer in layers.items():
            m, n = layer.weight.shape
            if n % GROUP_SIZE:
                raise ValueError(f"targets: expected layers with in_features a multiple of {GROUP_SIZE}, got "
                                 f"{name!r} with {n} (exclude it with targets=)")
            if start_rank > min(m, n):
                raise ValueError(f"start_rank: expected <= min(out, in) = {min(m, n)} for {name!r}, got {start_rank}")
        check_finite_weights(layers)  # else quantize_weight's error names its own W
        self.model = model
        self.steps = 0
        self.rank = start_rank
        self.layers: dict[str, QVGenLinear] = {}
        self._decayed_at: Optional[int] = None
        modules = dict(model.named_modules())
        with torch.no_grad():
            for names in self._groups({n: l.weight for n, l in layers.items()}).values():
                W = torch.stack([layers[n].weight.detach().float() for n in names])
                Wq = torch.stack([dequantize_weight(*quantize_weight(w), dtype=torch.float32) for w in W])
                U, S, Vh = torch.linalg.svd(W - Wq, full_matrices=False)
                root = S[:, :start_rank].sqrt()
                for i, name in enumerate(names):
                    old = layers[name]
                    w = old.weight
                    new = QVGenLinear(w.shape[1], w.shape[0], start_rank, bias=old.bias is not None,
                                      device=w.device, dtype=w.dtype)
                    new.weight.copy_(w)
                    if old.bias is not None:
                        new.bias.copy_(old.bias)
                    new.L.copy_(U[i, :, :start_rank] * root[i])
                    new.R.copy_(root[i, :, None] * Vh[i, :start_rank])
                    parent, _, attr = name.rpartition(".")
                    setattr(modules[parent], attr, new)
                    self.layers[name] = new

    @staticmethod
    def _groups(weights: dict[str, torch.Tensor]) -> dict[tuple, list[str]]:
        groups: dict[tuple, list[str]] = {}
        for n, w in weights.items():
            groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(n)
        return groups

    @property
    def total_steps(self) -> int:
        # Rank 1 is halved once too (straight to 0), then fades like any other rank.
        halvings = max(1, int(math.floor(math.log2(self.start_rank))))
        return self.every * (halvings + 1)

    @property
    def finished(self) -> bool:
        """No ``Φ`` left in any layer (neither trained nor fading)."""
        return all(layer.rank == 0 and layer.fade_L.shape[1] == 0 for layer in self.layers.values())

    @torch.no_grad()
    def step(self, optimizer: Any = None) -> None:
        """Advance one training step: update the fade weight, drop a finished fade, and
        halve the rank every ``every`` steps."""
        self.steps += 1
        if self._decayed_at is not None:
            s = self.steps - self._decayed_at
            w = 0.5 * (1.0 + math.cos(math.pi * min(s, self.every) / self.every))
            for layer in self.layers.values():
                layer.fade_weight.fill_(w)
            if s >= self.every:
                for layer in self.layers.values():
                    layer.fade_L = layer.fade_L.new_zeros(layer.out_features, 0)
                    layer.fade_R = layer.fade_R.new_zeros(0, layer.in_features)
                self._decayed_at = None
        if self.steps % self.every == 0 and self.rank > 0:
            self._halve(optimizer)

    def _halve(self, optimizer: Any) -> None:
        keep = self.rank // 2
        if keep < 2:
            keep = 0  # below rank 2: all of Φ fades and is removed
        for names in self._groups({n: l.weight for n, l in self.layers.items()}).values():  # shapes of L and R
            L = torch.stack([self.layers[n].L.detach() for n in names])
            R = torch.stack([self.layers[n].R.detach() for n in names])
            Lk, Rk, Lr, Rr = thin_halve(L, R, keep)
            for i, n in enumerate(names):
                layer = self.layers[n]
                _replace_param(layer, "L", Lk[i], optimizer)
                _replace_param(layer, "R", Rk[i], optimizer)
                layer.fade_L = Lr[i].contiguous()
                layer.fade_R = Rr[i].contiguous()
                layer.fade_weight.fill_(1.0)
        self.rank = keep
        self._decayed_at = self.steps

    @torch.no_grad()
    def remove_branches(self, optimizer: Any = None) -> None:
        """Drop every ``Φ`` now (ends the schedule early; the model is then Φ-free)."""
        for layer in self.layers.values():
            _replace_param(layer, "L", layer.L.new_zeros(layer.out_features, 0), optimizer)
            _replace_param(layer, "R", layer.R.new_zeros(0, layer.in_features), optimizer)
            layer.fade_L = layer.fade_L.new_zeros(layer.out_features, 0)
            layer.fade_R = layer.fade_R.new_zeros(0, layer.in_features)
        self.rank = 0
        self._decayed_at = None

    @torch.no_grad()
    def to_quantized(self) -> nn.Module:
        """Replace every (Φ-free) :class:`QVGenLinear` by a rank-0 W4A4
        :class:`~svdkernels.quant.LowRankQuantLinear` (the real int4 layer), in place.

        Raises:
            ValueError: some ``Φ`` is still present (train to :attr:`total_steps` or
                call :meth:`remove_branches`).
        """
        if not self.finished:
            raise ValueError(f"to_quantized: expected a Φ-free model (after {self.total_steps} steps), got rank "
                             f"{self.rank} at step {self.steps}")
        modules = dict(self.model.named_modules())
        for name, layer in self.layers.items():
            q = LowRankQuantLinear.from_float(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                                              rank=0, refine_iters=0, acts="int4", unsigned=False)
            parent, _, attr = name.rpartition(".")
            setattr(modules[parent], attr, q)
        return self.model

    def save(self, path: str | os.PathLike) -> None:
        """The model's state and the schedule (step, rank) to a safetensors file."""
        from safetensors.torch import save_file

        meta = {"format": "svdkernels.rank_decay", "version": "1",
                "schedule": json.dumps({"steps": self.steps, "rank": self.rank, "decayed_at": self._decayed_at,
                                        "start_rank": self.start_rank, "every": self.every})}
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(path), metadata=meta)

    def load(self, path: str | os.PathLike) -> None:
        """Load a file written by :meth:`save` into this model (same architecture, same
        ``start_rank`` and ``every``); ranks follow the file.

        Raises:
            FormatError: not a readable safetensors file of this format, a malformed
                schedule, or tensors that do not fit the model (checked on a copy first:
                the model is unchanged on failure).
            ValueError: the file's ``start_rank``/``every`` differ from this schedule's.
        """
        import copy

        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # unreadable or not safetensors
            raise FormatError(path, f"not a readable safetensors file ({e})") from e
        if meta.get("format") != "svdkernels.rank_decay" or meta.get("version") != "1":
            raise FormatError(path, f"expected metadata format svdkernels.rank_decay version 1, got "
                                    f"{meta.get('format')!r} version {meta.get('version')!r}")
        try:
            sched = json.loads(meta["schedule"])
            steps, rank, decayed = int(sched["steps"]), int(sched["rank"]), sched["decayed_at"]
            start_rank, every = int(sched["start_rank"]), int(sched["every"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(path, f"malformed schedule metadata ({e})") from e
        # What step() later reads: a counter, a rank the schedule can reach, the last halving's step.
        if steps < 0 or not 0 <= rank <= start_rank or not (
                decayed is None or (isinstance(decayed, int) and not isinstance(decayed, bool) and 0 <= decayed <= steps)):
            raise FormatError(path, f"malformed schedule metadata: expected steps >= 0, 0 <= rank <= start_rank and "
                                    f"decayed_at None or a step in [0, steps], got {sched!r}")
        if (start_rank, every) != (self.start_rank, self.every):
            raise ValueError(f"path: expected a schedule with start_rank={self.start_rank}, every={self.every}, got "
                             f"start_rank={start_rank}, every={every}")
        try:
            copy.deepcopy(self.model).load_state_dict(state)
        except (RuntimeError, ValueError) as e:
            detail = " ".join(line.strip() for line in str(e).splitlines()[1:]) or str(e)
            raise FormatError(path, f"tensors do not fit the model: {detail}") from e
        self.model.load_state_dict(state)
        self.steps, self.rank, self._decayed_at = steps, rank, decayed


__all__ = ["QVGenLinear", "RankDecay", "fake_quant_act", "fake_quant_weight", "thin_halve"]
