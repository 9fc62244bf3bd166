"""Low-rank gradient optimisers: :class:`LowRankAdamW` and its published presets.

GaLore (Zhao et al. 2024) keeps Adam's moments in a rank-``r`` projection of each weight
gradient and refreshes the projection every ``update_gap`` steps; Q-GaLore (Zhang et al.
2024) adapts the gap and stores the basis in int4; the SVD-free method (Modoranu et al.
2025) picks DCT-II vectors instead of computing an SVD; APOLLO (Zhu et al. 2024) uses a
seeded random basis. :class:`LowRankAdamW` is all of them, with:

- batched refresh: the bases of all due parameters of one (shape, side, dtype, device,
  rank, projector) are computed by one batched call (``torch.linalg.svd``,
  :func:`svdkernels.rsvd` or a warm-started subspace iteration, one DCT scoring product);
- the step itself by the fused op :func:`svdkernels.ops.lowrank_adam_step.lowrank_adam_step`;
- moments kept (GaLore), rotated into the new basis, or reset at a refresh;
- a state of tensors and plain numbers only (``torch.load(weights_only=True)`` reads it;
  resuming gives bit-identical weights);
- non-finite gradients caught, naming the parameter.

Update rule (GaLore's and Hugging Face's AdamW form, for projected and plain parameters
alike): ``m, v`` as Adam, ``N = m/(√v + eps)``, ``W ← W − lr·√(1−β2ᵗ)/(1−β1ᵗ)·scale·back(N)``,
then ``W ← W − lr·weight_decay·W`` (decoupled decay after the update). Plain parameters
use ``scale = 1`` and ``back = id``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from svdkernels.adapters.modules import Targets, matches
from svdkernels.ops.lowrank_adam_step import (
    bias_corrected_step_size,
    dequantize_basis,
    lowrank_adam_step,
    quantize_basis,
    stochastic_round,
)
from svdkernels.train import distributed as tdist
from svdkernels.train import projectors as proj
from svdkernels.train.distributed import local
from svdkernels.train.int8 import Int8Linear, dequantize_int8, is_int8_weight, quantize_int8
from svdkernels.train.projected_step import projected_adam_step

MOMENTS = ("keep", "rotate", "reset")
SIDES = (None, "right", "left")
COS_WINDOW = 5  # Q-GaLore: mean cosine over the last 5 refreshes
COS_THRESHOLD = 0.4  # ... at least 0.4 doubles the gap
# Group options of a low-rank group, their defaults come from the constructor.
_LOWRANK_KEYS = ("rank", "update_gap", "scale", "projector", "moments", "adaptive_gap", "proj_bits", "side")


def _mix(*values: int) -> int:
    """A deterministic 62-bit seed from integers (splitmix-style), the same on every run."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & ((1 << 62) - 1)


# The step's arithmetic and state are float32: a larger hyper-parameter (inf included)
# makes every weight inf/NaN, or fails inside torch ("cannot be converted to type float").
FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_number(name: str, value: object, lo: float, hi: float = FLOAT32_MAX, *, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not (lo <= value and (value < hi if hi_open else value <= hi)):
        raise ValueError(f"{name}: expected a value in [{lo}, {hi}{')' if hi_open else ']'}, got {value}")
    return float(value)


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value}")
    return value


def _check_choice(name: str, value: object, choices: Sequence[object]) -> Any:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


# The plain-number entries of a parameter's state and their lower bounds (step counters,
# the refresh schedule, a random basis's seed, layerwise's micro-batch counter).
_STATE_INTS = {"step": 0, "next_refresh": 0, "gap": 1, "refreshes": 0, "basis_seed": 0, "micro_batch": 0}


def _check_state_scalar(where: str, key: str, value: object) -> None:
    """A loaded state's non-tensor entry has the type (and range) the optimiser writes:
    a wrong one would only fail later, inside a step."""
    if key in _STATE_INTS:
        if isinstance(value, bool) or not isinstance(value, int) or value < _STATE_INTS[key]:
            raise ValueError(f"{where}: expected {key} an int >= {_STATE_INTS[key]}, got {value!r}")
    elif key == "cosines":
        if not isinstance(value, list) or not all(isinstance(c, (int, float)) and not isinstance(c, bool)
                                                  and math.isfinite(c) for c in value):
            raise ValueError(f"{where}: expected cosines a list of finite numbers, got {value!r}")
    elif key == "window_nonfinite" and value not in (0, 1):  # layerwise's flag, stored as 0/1
        raise ValueError(f"{where}: expected window_nonfinite 0 or 1, got {value!r}")


class LowRankAdamW(torch.optim.Optimizer):
    """AdamW whose low-rank groups keep their state in a rank-``r`` projection (GaLore).

    Args:
        params: parameters or param groups. Groups that set ``rank`` (as GaLore's:
            keys ``rank``, ``update_gap`` or GaLore's ``update_proj_gap``, ``scale``,
            ``proj_type`` ``"std"``/``"left"``/``"right"``, and any of ``projector``,
            ``moments``, ``adaptive_gap``, ``proj_bits``, ``side``) are trained in the
            projection; every other parameter gets plain AdamW. An optional ``names`` key
            (a list of strings, one per parameter; :func:`lowrank_param_groups` fills it)
            names parameters in errors.
        lr, betas, eps, weight_decay: AdamW's.
        rank: default rank of the low-rank groups; ``1 <= rank <= min(m, n)``.
        update_gap: steps between two refreshes of a basis (GaLore: 200).
        scale: multiplies the back-projected update (GaLore: 0.25).
        projector: ``"svd"``, ``"rsvd"`` (warm-started after the first refresh),
            ``"dct"`` or ``"random"`` (see :mod:`svdkernels.train.projectors`).
        moments: at a refresh, ``"keep"`` the moments as they are (GaLore), ``"rotate"``
            them into the new basis, or ``"reset"`` them to zero.
        adaptive_gap: Q-GaLore's rule, per parameter: after each refresh, the cosine of
            the first basis vector with the previous one; when the mean of the last 5 is
            at least 0.4, the gap doubles.
        proj_bits: ``None`` (float32 basis) or ``4`` (packed int4, group 256, for the
            ``svd``/``rsvd`` projectors).
        stagger: spread the refreshes of the different shape groups over the gap.
        seed: seeds every random choice (rsvd sketches, random bases, stochastic rounding).
        side: ``None`` (project on the smaller side: right if ``m >= n``), ``"right"``
            or ``"left"``.
        skip_nonfinite: a non-finite gradient skips the whole step (weights and state
            untouched, :attr:`skipped_steps` counts it) instead of raising ``ValueError``.
        stochastic_rounding: round bfloat16 weights stochastically after each update.
        process_group: under DDP (every rank holds the same, all-reduced gradients), the
            group whose ranks divide the refresh work: each shape group's bases are
            computed on one rank and broadcast (``dist.group.WORLD`` for the default).
            Not for FSDP2: its DTensor parameters carry their mesh.

    FSDP2 (``fully_shard``): parameters and gradients are row-sharded DTensors; the step
    stays local (the weights are projected on the right, ``side="left"`` is refused),
    the moments are sharded like the weights, the bases replicated, and only the
    refresh communicates (see :mod:`svdkernels.train.distributed`, whose
    ``sharded_state_dict`` saves the state with ``torch.distributed.checkpoint``). The
    weights equal a single-process run with ``side="right"`` to fp32 rounding. The
    ``rsvd`` bases have canonical signs (:func:`~svdkernels.train.projectors.canonical_signs`),
    so this holds with ``moments="keep"`` too. The one exception is ``projector="svd"``
    with ``moments="keep"`` (the :class:`GaLoreAdamW`/:class:`QGaLoreAdamW` defaults):
    ``svd`` keeps ``torch.linalg.svd``'s signs, as galore-torch does, so that
    :class:`GaLoreAdamW` reproduces it. The sharded factorisation may then return a basis
    vector of the other sign, and kept moments do not undo that (rotated ones do).
    Layerwise steps (:meth:`step_param`, :func:`~svdkernels.train.layerwise`) are refused
    under FSDP2 and with ``process_group``.

    Example::

        groups = svdkernels.train.lowrank_param_groups(model, targets=r".*(attn|mlp).*", rank=128)
        opt = svdkernels.train.LowRankAdamW(groups, lr=1e-3, projector="rsvd")
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rank: int = 128,
        update_gap: int = 200,
        scale: float = 0.25,
        projector: str = "rsvd",
        moments: str = "rotate",
        adaptive_gap: bool = False,
        proj_bits: Optional[int] = None,
        stagger: bool = False,
        seed: int = 0,
        side: Optional[str] = None,
        skip_nonfinite: bool = False,
        stochastic_rounding: bool = False,
        process_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        _check_number("lr", lr, 0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas: expected a pair of floats, got {betas!r}")
        _check_number("betas[0]", betas[0], 0.0, 1.0, hi_open=True)
        _check_number("betas[1]", betas[1], 0.0, 1.0, hi_open=True)
        _check_number("eps", eps, 0.0)
        _check_number("weight_decay", weight_decay, 0.0)
        _check_int("seed", seed, 0)
        for name, flag in (("stagger", stagger), ("skip_nonfinite", skip_nonfinite),
                           ("stochastic_rounding", stochastic_rounding)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group: expected None or a torch.distributed ProcessGroup, "
                            f"got {type(process_group).__name__}")
        self.process_group = process_group
        self._lowrank_defaults = dict(rank=rank, update_gap=update_gap, scale=scale, projector=projector,
                                      moments=moments, adaptive_gap=adaptive_gap, proj_bits=proj_bits, side=side)
        self._check_lowrank_options(self._lowrank_defaults, None)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.seed = seed
        self.stagger = stagger
        self.skip_nonfinite = skip_nonfinite
        self.stochastic_rounding = stochastic_rounding
        self.skipped_steps = 0
        self._cache: dict[torch.Tensor, torch.Tensor] = {}  # random/DCT bases, rebuilt from state
        super().__init__(params, defaults)
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._offsets = self._stagger_offsets()

    # ------------------------------------------------------------------ groups

    @staticmethod
    def _check_lowrank_options(opts: dict[str, Any], group: Optional[int]) -> None:
        """Options of a low-rank group; errors name ``param_groups[i]['key']`` (or the keyword)."""
        def at(key: str) -> str:
            return key if group is None else f"param_groups[{group}][{key!r}]"

        _check_int(at("rank"), opts["rank"], 1)
        _check_int(at("update_gap"), opts["update_gap"], 1)
        _check_number(at("scale"), opts["scale"], 0.0)
        _check_choice(at("projector"), opts["projector"], proj.PROJECTORS)
        _check_choice(at("moments"), opts["moments"], MOMENTS)
        if not isinstance(opts["adaptive_gap"], bool):
            raise TypeError(f"{at('adaptive_gap')}: expected a bool, got {type(opts['adaptive_gap']).__name__}")
        _check_choice(at("proj_bits"), opts["proj_bits"], (None, 4))
        if opts["proj_bits"] is not None and opts["projector"] not in ("svd", "rsvd"):
            raise ValueError(f"{at('proj_bits')}: expected None with projector {opts['projector']!r} "
                             f"(an int4 basis is for 'svd' and 'rsvd'), got {opts['proj_bits']}")
        _check_choice(at("side"), opts["side"], SIDES)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        gi = len(self.param_groups)
        group = dict(param_group)
        # A group may override AdamW's options (torch checks none of them).
        for key in ("lr", "eps", "weight_decay"):
            if key in group:
                _check_number(f"param_groups[{gi}][{key!r}]", group[key], 0.0)
        if "betas" in group:
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise TypeError(f"param_groups[{gi}]['betas']: expected a pair of floats, got {betas!r}")
            for i in range(2):
                _check_number(f"param_groups[{gi}]['betas'][{i}]", betas[i], 0.0, 1.0, hi_open=True)
        if "update_proj_gap" in group:  # GaLore's name
            group.setdefault("update_gap", group.pop("update_proj_gap"))
        if "proj_type" in group:
            kind = group.pop("proj_type")
            if kind not in ("std", "left", "right"):
                raise ValueError(f"param_groups[{gi}]['proj_type']: expected 'std', 'left' or 'right', got {kind!r}")
            group.setdefault("side", None if kind == "std" else kind)
        lowrank = "rank" in group
        group["lowrank"] = lowrank
        if lowrank:
            for key in _LOWRANK_KEYS:
                group.setdefault(key, self._lowrank_defaults[key])
            self._check_lowrank_options(group, gi)
        super().add_param_group(group)
        params = self.param_groups[-1]["params"]
        names = self.param_groups[-1].get("names")
        if names is not None and (not isinstance(names, list) or len(names) != len(params)
                                  or not all(isinstance(n, str) for n in names)):
            raise ValueError(f"param_groups[{gi}]['names']: expected a list of {len(params)} strings "
                             f"(one per parameter), got {names!r}")
        if lowrank:
            for pi, p in enumerate(params):
                self._check_lowrank_param(self.param_groups[-1], gi, pi, p)
        if hasattr(self, "_index"):  # a group added after construction
            self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            self._offsets = self._stagger_offsets()

    def _name(self, group: dict[str, Any], gi: int, pi: int, p: torch.Tensor) -> str:
        names = group.get("names")
        if names:
            return repr(names[pi])
        return f"param_groups[{gi}]['params'][{pi}] (shape {list(p.shape)})"

    def _check_lowrank_param(self, group: dict[str, Any], gi: int, pi: int, p: torch.Tensor) -> None:
        name = self._name(group, gi, pi, p)
        if p.dim() != 2:
            raise ValueError(f"parameter {name}: a low-rank group (rank set) expects 2-D weights [m, n], "
                             f"got shape {list(p.shape)}")
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16) and not is_int8_weight(p):
            raise TypeError(f"parameter {name}: expected dtype float32, bfloat16 or float16 (or an "
                            f"Int8Linear's qweight), got {p.dtype}")
        if group["rank"] > min(p.shape):
            raise ValueError(f"parameter {name}: expected rank <= min(m, n) = {min(p.shape)} for shape "
                             f"{list(p.shape)}, got rank {group['rank']}")
        if tdist.is_sharded(p):
            tdist.check_sharded_param(p, name, group["side"])
            if self.process_group is not None:
                raise ValueError(f"process_group: expected None with DTensor (FSDP2) parameters such as {name} "
                                 f"(their mesh is the group), got a process group")

    @staticmethod
    def side_of(group: dict[str, Any], p: torch.Tensor) -> bool:
        """True when ``p`` is projected on the right (``R = G·Pᵀ``), GaLore's rule by default;
        always for a row-sharded (FSDP2) weight, whose step is then local."""
        if tdist.is_sharded(p):
            return True
        side = group["side"]
        return p.shape[0] >= p.shape[1] if side is None else side == "right"

    def _key(self, group: dict[str, Any], p: torch.Tensor) -> tuple:
        return (tuple(p.shape), self.side_of(group, p), p.dtype, p.device, group["rank"], group["projector"],
                group["proj_bits"])

    def _stagger_offsets(self) -> dict[tuple, float]:
        """Each shape group's phase within the gap, as a fraction in [0, 1)."""
        keys: list[tuple] = []
        for group in self.param_groups:
            if group["lowrank"]:
                for p in group["params"]:
                    k = self._key(group, p)
                    if k not in keys:
                        keys.append(k)
        return {k: i / len(keys) for i, k in enumerate(keys)}

    # ------------------------------------------------------------------ step

    def _grads(self) -> list[tuple[dict[str, Any], int, int, torch.Tensor, torch.Tensor]]:
        out = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                g = self._grad_of(p)
                if g is not None:
                    if g.is_sparse:
                        raise ValueError(f"parameter {self._name(group, gi, pi, p)}: sparse gradients are not supported")
                    out.append((group, gi, pi, p, g))
        return out

    @staticmethod
    def _grad_of(p: torch.Tensor) -> Optional[torch.Tensor]:
        """``p.grad``, or the float gradient an :class:`Int8Linear` keeps beside its int8 weight."""
        return getattr(p, "float_grad", None) if is_int8_weight(p) else p.grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if is_int8_weight(p):
                    p.float_grad = None

    def _nonfinite(self, items: list) -> Optional[str]:
        """The name of the first parameter with a non-finite gradient, or None. One host
        synchronisation: per-gradient sums (non-finite iff an entry is, unless the sum
        overflows, when the entries are checked)."""
        if not items:
            return None
        # no float copy of a bf16 gradient
        sums = torch.stack([local(g).sum(dtype=torch.float32) for *_, g in items])
        mesh_group = next((tdist.group_of(g) for *_, g in items if tdist.is_sharded(g)), None)
        if mesh_group is not None:  # sharded gradients: every rank must reach the same verdict
            sums = tdist.allreduce(sums, mesh_group)
        bad = (~torch.isfinite(sums)).nonzero().flatten().tolist()
        for i in bad:
            group, gi, pi, p, g = items[i]
            found = (~torch.isfinite(local(g))).any().float().reshape(1)
            if tdist.is_sharded(g):
                found = tdist.allreduce(found, tdist.group_of(g))
            if bool(found.item()):
                return self._name(group, gi, pi, p)
        return None

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None) -> Optional[torch.Tensor]:
        """One optimisation step (refreshing the bases that are due first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = self._grads()
        bad = self._nonfinite(items)
        if bad is not None:
            if self.skip_nonfinite:
                self.skipped_steps += 1
                return loss
            raise ValueError(f"parameter {bad}: non-finite gradient (NaN or inf); pass skip_nonfinite=True "
                             f"to skip such steps")
        self._refresh([it for it in items if it[0]["lowrank"]])
        for group, gi, pi, p, g in items:
            self._update(group, p, g)
        return loss

    def step_param(self, p: torch.Tensor) -> None:
        """The step of parameter ``p`` alone (used by :func:`svdkernels.train.layerwise`);
        its basis is refreshed alone when due."""
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    if tdist.is_sharded(p) or self.process_group is not None:
                        raise ValueError("p: layerwise steps (step_param) are not supported for FSDP2 "
                                         "parameters or with a process_group; call step()")
                    g = self._grad_of(p)
                    if g is None:
                        return
                    item = (group, gi, pi, p, g)
                    bad = self._nonfinite([item])
                    if bad is not None:
                        if self.skip_nonfinite:
                            self.skipped_steps += 1
                            return
                        raise ValueError(f"parameter {bad}: non-finite gradient (NaN or inf)")
                    with torch.no_grad():
                        if group["lowrank"]:
                            self._refresh([item])
                        self._update(group, p, g)
                    return
        raise ValueError("p: expected a parameter of this optimizer, got one it does not hold")

    @torch.no_grad()
    def refresh(self) -> None:
        """Refresh now, batched, the basis of every low-rank parameter that has a gradient,
        as if all were due (e.g. after changing the data distribution)."""
        items = [it for it in self._grads() if it[0]["lowrank"]]
        for it in items:
            state = self.state[it[3]]
            if "next_refresh" in state:  # without one, a parameter is due anyway
                state["next_refresh"] = min(state["next_refresh"], state.get("step", 0))
        self._refresh(items)

    def state_bytes(self) -> int:
        """Bytes of the optimiser's state tensors held by this process (a sharded state's
        local shards), plus the DCT/random bases it keeps gathered between refreshes
        (rebuilt from the state, not saved)."""
        total = sum(local(v).numel() * local(v).element_size() for st in self.state.values()
                    for v in st.values() if isinstance(v, torch.Tensor))
        return total + sum(t.numel() * t.element_size() for t in self._cache.values())

    def _sr_seed(self, p: torch.Tensor, step: int) -> Optional[int]:
        if self.stochastic_rounding and p.dtype == torch.bfloat16:
            # A shard's rounding stream is keyed by its first row too (its flat indices restart at 0).
            extra = (tdist.row_offset(p),) if tdist.is_sharded(p) else ()
            return _mix(self.seed, 2, self._index[p], step, *extra)
        return None

    def _update(self, group: dict[str, Any], p: torch.Tensor, g: torch.Tensor, *, projected: bool = False) -> None:
        """Step ``p`` from its gradient ``g``, or (``projected``, low-rank ``p`` only) from
        its rank-space gradient ``g [m, r]``/``[r, n]`` float32 (layerwise accumulation)."""
        state = self.state[p]
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["exp_avg"] = self.empty_state(group, p, "exp_avg")
            state["exp_avg_sq"] = self.empty_state(group, p, "exp_avg_sq")
        state["step"] = state.get("step", 0) + 1
        t = state["step"]
        step_size = bias_corrected_step_size(group["lr"], beta1, beta2, t)
        decay = group["lr"] * group["weight_decay"]
        if is_int8_weight(p):
            # Q-GaLore: step a transient float32 copy, write it back to INT8 stochastically.
            w = dequantize_int8(p, p.int8_scales)
            self._step_tensor(group, p, w, g.float(), step_size, decay, None, projected)
            q, scales = quantize_int8(w, sr_seed=_mix(self.seed, 4, self._index[p], t))
            p.copy_(q)
            p.int8_scales.copy_(scales)
            return
        if projected:
            self._step_tensor(group, p, p, g, step_size, decay, self._sr_seed(p, t), True)
            return
        self._step_tensor(group, p, local(p), local(g).to(p.dtype), step_size, decay, self._sr_seed(p, t))

    def _step_padded(self, group: dict[str, Any], w: torch.Tensor, g: torch.Tensor, P: torch.Tensor,
                     P_scale: Optional[torch.Tensor], P_zero: Optional[torch.Tensor], m: torch.Tensor,
                     v: torch.Tensor, step_size: float, decay: float, sr: Optional[int]) -> None:
        """The right-side step of a shard ``w [a, n]`` with ``a < r`` rows, on copies padded
        with zero rows to ``r``: exact, since every row of the right-side step depends on
        that row alone and a zero row stays zero."""
        r = P.shape[0]

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros((r - t.shape[0], *t.shape[1:]))])

        W, mp, vp = pad(w), pad(m), pad(v)
        lowrank_adam_step(W, pad(g), P, mp, vp, step_size=step_size * group["scale"], side="right",
                          betas=group["betas"], eps=group["eps"], decay=decay, P_scale=P_scale, P_zero=P_zero,
                          sr_seed=sr)
        rows = w.shape[0]
        w.copy_(W[:rows])
        m.copy_(mp[:rows])
        v.copy_(vp[:rows])

    def _step_tensor(self, group: dict[str, Any], p: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                     step_size: float, decay: float, sr: Optional[int], projected: bool = False) -> None:
        """The AdamW step of parameter ``p``'s state applied to the weight tensor ``w``
        (``g`` already projected to rank space when ``projected``)."""
        state = self.state[p]
        beta1, beta2 = group["betas"]
        if projected:
            projected_adam_step(w, g, self._float_basis(group, p), state["exp_avg"], state["exp_avg_sq"],
                                right=self.side_of(group, p), betas=(beta1, beta2), eps=group["eps"],
                                step_size=step_size * group["scale"], decay=decay, sr_seed=sr)
            return
        if group["lowrank"]:
            P, P_scale, P_zero = self._basis(group, p)
            right = self.side_of(group, p)
            m, v = local(state["exp_avg"]), local(state["exp_avg_sq"])
            if w.shape[0] < P.shape[0]:  # a shard with fewer rows than the rank (the op wants r <= min(m, n))
                if w.shape[0] > 0:
                    self._step_padded(group, w, g, P, P_scale, P_zero, m, v, step_size, decay, sr)
                return
            lowrank_adam_step(w, g, P, m, v,
                              step_size=step_size * group["scale"], side="right" if right else "left",
                              betas=(beta1, beta2), eps=group["eps"], decay=decay, P_scale=P_scale, P_zero=P_zero,
                              sr_seed=sr)
            return
        m, v = local(state["exp_avg"]), local(state["exp_avg_sq"])
        gf = g.float()
        m.mul_(beta1).add_(gf, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(gf, gf, value=1.0 - beta2)
        denom = v.sqrt().add_(group["eps"])
        if w.dtype == torch.float32:  # in place, one temporary (denom) as torch's AdamW
            w.addcdiv_(m, denom, value=-step_size)
            if decay != 0.0:
                w.add_(w, alpha=-decay)
            return
        new = w.float().addcdiv_(m, denom, value=-step_size)
        if decay != 0.0:
            new.add_(new, alpha=-decay)
        w.copy_(stochastic_round(new, sr) if sr is not None else new.to(w.dtype))

    # ------------------------------------------------------------------ bases

    def _basis(self, group: dict[str, Any], p: torch.Tensor
               ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """What the step op reads: float rows ``[r, k]``, or the packed int4 triple."""
        state = self.state[p]
        if "basis" in state:
            scale, zero = state.get("basis_scale"), state.get("basis_zero")
            return local(state["basis"]), None if scale is None else local(scale), None if zero is None else local(zero)
        if p not in self._cache:  # DCT / random: rebuilt from the indices or the seed
            k = p.shape[1] if self.side_of(group, p) else p.shape[0]
            if "dct_index" in state:
                self._cache[p] = proj.dct_bases(local(state["dct_index"]), k).contiguous()
            else:
                self._cache[p] = proj.random_basis(state["basis_seed"], group["rank"], k, local(p).device)
        return self._cache[p], None, None

    def _float_basis(self, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor:
        P, s, z = self._basis(group, p)
        if P.dtype == torch.uint8:
            k = p.shape[1] if self.side_of(group, p) else p.shape[0]
            return dequantize_basis(P, s, z, k)
        return P

    def _due(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        state = self.state[p]
        return "next_refresh" not in state or state.get("step", 0) >= state["next_refresh"]

    def _refresh(self, items: list) -> None:
        """Refresh every due basis, one batched call per (shape, side, ...) group."""
        batches: dict[tuple, list] = {}
        for it in items:
            group, _, _, p, _ = it
            if self._due(group, p):
                batches.setdefault(self._key(group, p), []).append(it)
        owners = None
        if self.process_group is not None and dist.get_world_size(self.process_group) > 1:
            # DDP: divide the factorisations among the ranks (the same plan everywhere).
            costs = [float(len(b) * math.prod(key[0])) for key, b in batches.items()]
            owners = tdist.plan_owners(costs, dist.get_world_size(self.process_group))
        for i, (key, batch) in enumerate(batches.items()):
            self._refresh_batch(key, batch, None if owners is None else owners[i])

    def _new_bases(self, key: tuple, batch: list, seed: int, old: list, had: list
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The new float bases ``[b, r, k]`` of a batch (and the DCT indices ``[b, r]``),
        computed here from the batch's gradients (row-sharded ones: with collectives)."""
        shape, right, _, _, rank, projector, _ = key
        k = shape[1] if right else shape[0]
        G = torch.stack([local(g).float() for *_, g in batch])  # [b, m, n] (this rank's rows if sharded)
        p0 = batch[0][3]
        previous = torch.stack(old) if projector == "rsvd" and all(had) else None
        if tdist.is_sharded(p0):
            mesh_group = tdist.group_of(p0)
            if projector == "dct":
                index = tdist.sharded_dct_indices(G, rank, mesh_group, proj.dct_matrix(k, G.device)).to(torch.int32)
                return proj.dct_bases(index, k), index
            if projector == "svd":
                return tdist.sharded_svd_bases(G, rank, mesh_group), None
            # Canonical signs: the sharded factorisation may return a row of the other sign
            # than one process's (projectors.canonical_signs; kept moments need the same one).
            if previous is not None:
                return proj.canonical_signs(proj.warm_subspace(
                    G, previous, rank, True, seed=seed, allreduce=lambda t: tdist.allreduce(t, mesh_group))), None
            return proj.canonical_signs(tdist.sharded_rsvd_bases(G, shape[0], rank, seed=seed, p=p0)), None
        if projector == "dct":
            index = proj.dct_indices(G, rank, right).to(torch.int32)
            return proj.dct_bases(index, k), index
        return proj.bases_for(projector, G, rank, right, seed=seed, previous=previous), None

    def _refresh_batch(self, key: tuple, batch: list, owner: Optional[int] = None) -> None:
        """Refresh one shape group; under DDP (``owner`` set) only the group rank ``owner``
        factorises, the others receive its bases."""
        shape, right, _, _, rank, projector, proj_bits = key
        k = shape[1] if right else shape[0]
        params = [it[3] for it in batch]
        states = [self.state[p] for p in params]
        step = states[0].get("step", 0)
        seed = _mix(self.seed, 1, self._index[params[0]], step)
        had = ["next_refresh" in s for s in states]
        old = [self._float_basis(it[0], it[3]) if h else None for it, h in zip(batch, had)]
        new_index = new_seeds = None
        if projector == "random":  # seeded: nothing to factorise or send
            new_seeds = [_mix(self.seed, 3, self._index[p], s.get("refreshes", 0)) for p, s in zip(params, states)]
            device = local(params[0]).device
            new = torch.stack([proj.random_basis(sd, rank, k, device) for sd in new_seeds])
        elif owner is None:
            new, new_index = self._new_bases(key, batch, seed, old, had)
        else:
            mine = dist.get_rank(self.process_group) == owner
            if mine:
                new, new_index = self._new_bases(key, batch, seed, old, had)
            device = params[0].device
            if projector == "dct":  # the indices define the basis
                new_index = tdist.broadcast_from(new_index if mine else None, (len(batch), rank), torch.int32,
                                                 device, owner, self.process_group)
                new = proj.dct_bases(new_index, k)
            else:
                new = tdist.broadcast_from(new if mine else None, (len(batch), rank, k), torch.float32,
                                           device, owner, self.process_group)
        if proj_bits == 4:
            packed, scales, zeros = quantize_basis(new)
            stored = dequantize_basis(packed, scales, zeros, k)  # what the steps will see
        else:
            stored = new
        if all(had):
            self._carry_moments(batch, states, old, stored, new_index, right)
            cos = proj.first_vector_cosine(stored, torch.stack(old)).tolist()
        else:
            cos = [None] * len(batch)
        for i, (group, _, _, p, _) in enumerate(batch):
            state = self.state[p]
            self._cache.pop(p, None)
            for name in ("basis", "basis_scale", "basis_zero", "dct_index", "basis_seed"):
                state.pop(name, None)
            if projector == "dct":
                state["dct_index"] = new_index[i].clone()
            elif projector == "random":
                state["basis_seed"] = new_seeds[i]
            elif proj_bits == 4:
                state["basis"], state["basis_scale"], state["basis_zero"] = (
                    packed[i].clone(), scales[i].clone(), zeros[i].clone())
            else:
                state["basis"] = new[i].clone()
            gap = state.get("gap", group["update_gap"])
            if group["adaptive_gap"] and cos[i] is not None:
                history = (state.get("cosines", []) + [float(cos[i])])[-COS_WINDOW:]
                state["cosines"] = history
                if len(history) == COS_WINDOW and sum(history) / COS_WINDOW >= COS_THRESHOLD:
                    gap *= 2
            state["gap"] = gap
            state["refreshes"] = state.get("refreshes", 0) + 1
            first = "next_refresh" not in state
            offset = int(self._offsets.get(key, 0.0) * gap) if self.stagger else 0
            # The first refresh of a staggered group comes early by its phase; later ones a gap apart.
            state["next_refresh"] = step + (offset if first and offset > 0 else gap)
            for name in ("basis", "basis_scale", "basis_zero", "dct_index"):
                if name in state:  # a sharded weight's basis is replicated on its mesh
                    state[name] = tdist.replicated(p, state[name])

    def _carry_moments(self, batch: list, states: list, old: list, new: torch.Tensor,
                       new_index: Optional[torch.Tensor], right: bool) -> None:
        mode = batch[0][0]["moments"]
        if mode == "keep" or "exp_avg" not in states[0]:
            return
        if mode == "reset":
            for s in states:
                s["exp_avg"].zero_()
                s["exp_avg_sq"].zero_()
            return
        if new_index is not None:
            C = proj.dct_change_of_basis(new_index, torch.stack([local(s["dct_index"]) for s in states]))
        else:
            C = proj.change_of_basis(new, torch.stack(old))
        m, v = proj.rotate_moments(torch.stack([local(s["exp_avg"]) for s in states]),
                                   torch.stack([local(s["exp_avg_sq"]) for s in states]), C, right)
        for i, s in enumerate(states):
            local(s["exp_avg"]).copy_(m[i])
            local(s["exp_avg_sq"]).copy_(v[i])

    # ------------------------------------------------------------------ state

    def state_entries(self, group: dict[str, Any], p: torch.Tensor) -> tuple[str, ...]:
        """The tensor entries a parameter's state holds once it has stepped."""
        if not group["lowrank"]:
            return ("exp_avg", "exp_avg_sq")
        if group["projector"] == "dct":
            return ("exp_avg", "exp_avg_sq", "dct_index")
        if group["projector"] == "random":
            return ("exp_avg", "exp_avg_sq")
        if group["proj_bits"] == 4:
            return ("exp_avg", "exp_avg_sq", "basis", "basis_scale", "basis_zero")
        return ("exp_avg", "exp_avg_sq", "basis")

    def empty_state(self, group: dict[str, Any], p: torch.Tensor, entry: str) -> torch.Tensor:
        """Zeros of a state entry's shape and dtype (:meth:`_expected`): the moments split by
        rows like a sharded weight, the bases replicated on its mesh."""
        shape, dtype = self._expected(group, p, entry)
        if entry in ("exp_avg", "exp_avg_sq"):
            return tdist.zeros_like_rows(p, tuple(shape))
        return tdist.replicated(p, torch.zeros(shape, dtype=dtype, device=local(p).device))

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["lowrank"] = {"skipped_steps": self.skipped_steps}
        return sd

    def _expected(self, group: dict[str, Any], p: torch.Tensor, key: str) -> Optional[tuple[tuple[int, ...], torch.dtype]]:
        if not group["lowrank"]:
            return {"exp_avg": (tuple(p.shape), torch.float32), "exp_avg_sq": (tuple(p.shape), torch.float32)}.get(key)
        right, r = self.side_of(group, p), group["rank"]
        k = p.shape[1] if right else p.shape[0]
        moments = (p.shape[0], r) if right else (r, p.shape[1])
        return {
            "exp_avg": (moments, torch.float32), "exp_avg_sq": (moments, torch.float32),
            "basis": ((r, (k + 1) // 2), torch.uint8) if group["proj_bits"] == 4 else ((r, k), torch.float32),
            "basis_scale": ((r, -(-k // 256)), torch.float32), "basis_zero": ((r, -(-k // 256)), torch.float32),
            "dct_index": ((r,), torch.int32),
            "grad_acc": (moments, torch.float32),  # layerwise: the window's rank-space gradient sum
        }.get(key)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`; shapes and dtypes are checked against the
        parameters first (``ValueError`` naming the parameter; nothing changed)."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise TypeError("state_dict: expected a dict with 'state' and 'param_groups' (from state_dict()), "
                            f"got {type(state_dict).__name__}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict: expected {len(self.param_groups)} param groups, got {len(saved_groups)}")
        id_to_param = {}
        for gi, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(mine["params"]) != len(saved["params"]):
                raise ValueError(f"state_dict: param group {gi}: expected {len(mine['params'])} parameters, "
                                 f"got {len(saved['params'])}")
            for key in ("lowrank", "rank", "proj_bits", "projector", "side"):
                if mine.get(key) != saved.get(key):
                    raise ValueError(f"state_dict: param group {gi}: expected {key} = {mine.get(key)!r}, "
                                     f"got {saved.get(key)!r}")
            for pi, (pid, p) in enumerate(zip(saved["params"], mine["params"])):
                id_to_param[pid] = (mine, gi, pi, p)
        for pid, st in state_dict["state"].items():
            if pid not in id_to_param:
                raise ValueError(f"state_dict: state for parameter id {pid}, which no param group lists")
            group, gi, pi, p = id_to_param[pid]
            if not isinstance(st, dict):
                raise TypeError(f"state_dict: parameter {self._name(group, gi, pi, p)}: expected a dict of "
                                f"state entries, got {type(st).__name__}")
            for key, value in st.items():
                _check_state_scalar(f"state_dict: parameter {self._name(group, gi, pi, p)}", key, value)
                want = self._expected(group, p, key)
                if want is not None and not isinstance(value, torch.Tensor):
                    raise TypeError(f"state_dict: parameter {self._name(group, gi, pi, p)}: expected {key} a "
                                    f"tensor, got {type(value).__name__}")
                if not isinstance(value, torch.Tensor):
                    continue
                if want is not None and (tuple(value.shape) != tuple(want[0]) or value.dtype != want[1]):
                    raise ValueError(f"state_dict: parameter {self._name(group, gi, pi, p)}: expected {key} of "
                                     f"shape {list(want[0])} and dtype {want[1]}, got shape {list(value.shape)} "
                                     f"and dtype {value.dtype}")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "lowrank"})
        # torch casts floating state to the parameter's dtype; keep ours exactly as saved.
        for pid, st in state_dict["state"].items():
            p = id_to_param[pid][3]
            for key, value in st.items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
                elif isinstance(value, list):
                    self.state[p][key] = list(value)
        self.skipped_steps = int(state_dict.get("lowrank", {}).get("skipped_steps", 0))
        self._cache.clear()
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._offsets = self._stagger_offsets()


# ---------------------------------------------------------------------- presets


class GaLoreAdamW(LowRankAdamW):
    """GaLore's AdamW (Zhao et al. 2024) with galore-torch's defaults: exact SVD, moments
    kept across refreshes, ``eps = 1e-6``, rank 128, gap 200, scale 0.25."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, **kwargs: Any) -> None:
        kwargs.setdefault("projector", "svd")
        kwargs.setdefault("moments", "keep")
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class QGaLoreAdamW(LowRankAdamW):
    """Q-GaLore (Zhang et al. 2024): GaLore with the adaptive gap (cosine rule) and the
    basis stored as packed int4 (group 256). Its INT8 weights are
    :class:`svdkernels.train.Int8Linear` layers; its 8-bit moments are not reproduced
    (moments stay float32)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, **kwargs: Any) -> None:
        kwargs.setdefault("projector", "svd")
        kwargs.setdefault("moments", "keep")
        kwargs.setdefault("adaptive_gap", True)
        kwargs.setdefault("proj_bits", 4)
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class DCTAdamW(LowRankAdamW):
    """The SVD-free optimiser (Modoranu et al. 2025): DCT-II columns chosen by the ℓ1 norm
    of the gradient's coefficients, moments rotated (re-indexed) at each refresh; the
    published default refreshes every step (``update_gap=1``: one batched scoring product
    per shape group and step; the step itself only gathers ``r`` DCT rows)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **kwargs: Any) -> None:
        kwargs.setdefault("update_gap", 1)
        kwargs.setdefault("projector", "dct")
        kwargs.setdefault("moments", "rotate")
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


# ---------------------------------------------------------------------- param groups


def lowrank_param_groups(model: nn.Module, targets: Targets = None, *, rank: int = 128,
                         **options: Any) -> list[dict[str, Any]]:
    """Param groups for :class:`LowRankAdamW`: the weights of the ``nn.Linear`` (and
    :class:`Int8Linear`) layers that ``targets`` selects (the adapters' rule, peft's
    ``target_modules``: a regex matching the whole name, or a list of names or dotted
    suffixes; ``None``: all) in one low-rank group, every other trainable
    parameter in a plain AdamW group. Both carry ``names``.

    ``options`` go into the low-rank group (``update_gap``, ``scale``, ``projector``...).
    A targeted weight whose smaller side is below ``rank`` raises ``ValueError`` naming it
    (when the optimiser is built).
    """
    if targets is not None and not isinstance(targets, str):
        if not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets):
            raise TypeError(f"targets: expected None, a regex string or a list of module names, got {targets!r}")
    chosen: dict[int, str] = {}
    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear) and matches(mname, targets) and module.weight.requires_grad:
            chosen[id(module.weight)] = f"{mname}.weight"
        elif isinstance(module, Int8Linear) and matches(mname, targets):
            chosen[id(module.qweight)] = f"{mname}.qweight"
    if not chosen:
        raise ValueError(f"targets: expected names matching nn.Linear layers of the model, got {targets!r} "
                         f"which matches none")
    low, low_names, rest, rest_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad and id(p) not in chosen:
            continue
        if id(p) in chosen:
            low.append(p)
            low_names.append(name)
        else:
            rest.append(p)
            rest_names.append(name)
    groups = [dict(params=low, names=low_names, rank=rank, **options)]
    if rest:
        groups.append(dict(params=rest, names=rest_names))
    return groups
