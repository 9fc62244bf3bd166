"""Benchmark family ``optim``: low-rank gradient optimisers (the trainer layer).

Two workloads, every peer measured in the same run:

1. **Projector refresh** of every linear weight of a Llama-7B-shaped block at quarter
   width (q, k, v, o ``1024×1024``; gate, up ``2752×1024``; down ``1024×2752``), rank 128,
   on gradient-like matrices (a slowly decaying spectrum ``σ_i = i^-0.5``, harder than
   real gradients). Ours: one batched :func:`svdkernels.rsvd` per shape group (cold), the
   warm-started subspace iteration of a later refresh (from the bases of a perturbed
   gradient), and the DCT scoring product. Peer: galore-torch's per-matrix full
   ``torch.linalg.svd`` (``GaLoreProjector.get_orthogonal_matrix``). Accuracy: the
   captured gradient energy ``‖proj(G)‖/‖G‖`` over the exact SVD's, worst over the block.
2. **Training** a ~20M-parameter Llama (:func:`svdkernels.testing.llama.small_llama`) on
   the standard library's docstrings (MiniLM tokenizer), same data order, learning rate
   and rank for every optimiser: ours (``rsvd``, ``dct``, the Q-GaLore preset; the ``rsvd``
   one also with :func:`layerwise`), ``torch.optim.AdamW``, galore-torch ``GaLoreAdamW``,
   q-galore-torch ``QGaLoreAdamW8bit`` and apollo-torch ``APOLLOAdamW`` where they import
   and run here. Per optimiser: mean step time (forward, backward and optimiser) over
   the last refresh period, the refresh alone, optimiser-state bytes, peak memory of one
   step and held-out loss after the run; the loss curves go to ``OUT/optim.png``.

Peak memory: CUDA's allocator peak on a GPU; on the CPU the peak of the running sum of
the allocations and frees the profiler records during one step (``profile_memory``).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from svdkernels.bench import Row, bench_device, register, time_fn
from svdkernels.train import DCTAdamW, LowRankAdamW, QGaLoreAdamW, layerwise, lowrank_param_groups
from svdkernels.train import projectors as proj


# ---------------------------------------------------------------------------- refresh


BLOCK_7B_QUARTER = {"q,k,v,o": (4, 1024, 1024), "gate,up": (2, 2752, 1024), "down": (1, 1024, 2752)}


def block_shapes(quick: bool) -> dict[str, tuple[int, int, int]]:
    """``{name: (count, m, n)}`` of the refresh workload's weights."""
    if quick:
        return {"q,k,v,o": (4, 128, 128), "gate,up": (2, 344, 128), "down": (1, 128, 344)}
    return dict(BLOCK_7B_QUARTER)


def gradients(shapes: dict[str, tuple[int, int, int]], seed: int = 0, decay: float = 0.5) -> dict[str, torch.Tensor]:
    """Stacked gradient-like matrices ``[count, m, n]`` float32 per shape: Haar-random
    singular vectors, ``σ_i = (i+1)^-decay`` (rescaled to unit spectral norm)."""
    from svdkernels.testing.matrices import spectral_matrix

    out = {}
    for i, (name, (count, m, n)) in enumerate(shapes.items()):
        out[name] = spectral_matrix("poly", m, n, batch=(count,), decay=decay, seed=seed + i).A.float()
    return out


def _energy(G: torch.Tensor, P: torch.Tensor, right: bool) -> torch.Tensor:
    return proj.captured_energy(G.double(), P.double(), right)


def galore_refresh(Gs: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """galore-torch's refresh: one full SVD per matrix, one matrix at a time."""
    from galore_torch.galore_projector import GaLoreProjector

    projector = GaLoreProjector(rank, update_proj_gap=200, scale=0.25, proj_type="std")
    out = {}
    for name, G in Gs.items():
        right = G.shape[1] >= G.shape[2]
        out[name] = torch.stack([projector.get_orthogonal_matrix(g, rank, "right" if right else "left")
                                 for g in G])
        if not right:
            out[name] = out[name].mT  # [m, r] columns -> rows
    return out


def ours_refresh(Gs: dict[str, torch.Tensor], rank: int, previous: Optional[dict[str, torch.Tensor]] = None
                 ) -> dict[str, torch.Tensor]:
    """Ours: one batched call per shape group (rsvd cold, or the warm subspace iteration)."""
    out = {}
    for name, G in Gs.items():
        right = G.shape[1] >= G.shape[2]
        prev = None if previous is None else previous[name]
        out[name] = proj.bases_for("rsvd", G, rank, right, seed=0, previous=prev)
    return out


def dct_refresh(Gs: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, G in Gs.items():
        right = G.shape[1] >= G.shape[2]
        out[name] = proj.dct_bases(proj.dct_indices(G, rank, right), G.shape[2] if right else G.shape[1])
    return out


def _refresh_rows(quick: bool, repeats: int) -> Iterator[Row | str]:
    rank = 16 if quick else 128
    shapes = block_shapes(quick)
    name = f"refresh 7B block/4, r{rank}" if not quick else f"refresh block (quick), r{rank}"
    yield name
    Gs = gradients(shapes)
    exact = {k: proj.svd_bases(G, rank, G.shape[1] >= G.shape[2]) for k, G in Gs.items()}
    exact_e = {k: _energy(G, exact[k], G.shape[1] >= G.shape[2]) for k, G in Gs.items()}
    # A later refresh: the gradient has moved a little since the previous bases.
    g = torch.Generator().manual_seed(7)
    moved = {k: G + 0.05 * G.norm(dim=(-2, -1), keepdim=True) / math.sqrt(G.shape[-1] * G.shape[-2])
             * torch.randn(G.shape, generator=g) for k, G in Gs.items()}

    def ratio(bases: dict[str, torch.Tensor], mats: dict[str, torch.Tensor]) -> float:
        worst = 1.0
        for k, G in mats.items():
            right = G.shape[1] >= G.shape[2]
            ex = exact_e[k] if mats is Gs else _energy(G, proj.svd_bases(G, rank, right), right)
            worst = min(worst, float((_energy(G, bases[k], right) / ex).min()))
        return worst

    reps = repeats  # ours are cheap: the full median; galore-torch (tens of seconds) once
    t_ours, b_ours = time_fn(lambda: ours_refresh(Gs, rank), repeats=reps, warmup=1)
    t_warm, b_warm = time_fn(lambda: ours_refresh(moved, rank, previous=b_ours), repeats=reps, warmup=1)
    t_dct, b_dct = time_fn(lambda: dct_refresh(Gs, rank), repeats=reps, warmup=1)
    yield Row(name, "ours: batched rsvd (cold)", t_ours * 1e3, kind="ours",
              errors={"energy/exact": ratio(b_ours, Gs)})
    yield Row(name, "ours: warm-started, 1 pass (later refresh)", t_warm * 1e3,
              errors={"energy/exact": ratio(b_warm, moved)})
    yield Row(name, "ours: DCT scoring (batched)", t_dct * 1e3, errors={"energy/exact": ratio(b_dct, Gs)})
    try:
        t_gal, b_gal = time_fn(lambda: galore_refresh(Gs, rank), repeats=1, warmup=0)
        yield Row(name, "galore-torch: per-matrix linalg.svd", t_gal * 1e3,
                  errors={"energy/exact": ratio(b_gal, Gs)})
    except ImportError as e:
        yield Row(name, "galore-torch: per-matrix linalg.svd", None, note=f"not installed: {e}")


# ---------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainWorkload:
    steps: int
    gap: int
    batch: int
    seq_len: int
    rank: int
    lr: float
    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    heads: int = 4
    heldout_blocks: int = 64

    @property
    def name(self) -> str:
        return (f"Llama h{self.hidden} L{self.layers}, {self.steps} steps of {self.batch}x{self.seq_len}, "
                f"r{self.rank} gap {self.gap}")


def train_workload(quick: bool) -> TrainWorkload:
    if quick:
        return TrainWorkload(steps=4, gap=2, batch=2, seq_len=16, rank=8, lr=2e-3, hidden=64, intermediate=172,
                             layers=1, heads=2, heldout_blocks=4)
    # Sized for a 2-core CPU, 7 optimisers in one run (a GPU run can raise steps to 500).
    return TrainWorkload(steps=60, gap=20, batch=4, seq_len=64, rank=64, lr=2e-3)


def _galore_group(targets: list, rank: int, gap: int, **extra: Any) -> dict[str, Any]:
    return dict(params=targets, rank=rank, update_proj_gap=gap, scale=0.25, proj_type="std", **extra)


def _split(model: torch.nn.Module) -> tuple[list, list]:
    import re

    from svdkernels.testing.llama import LLAMA_TARGETS

    low_ids = {id(m.weight) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and re.fullmatch(LLAMA_TARGETS, n)}
    low = [p for p in model.parameters() if id(p) in low_ids]
    rest = [p for p in model.parameters() if id(p) not in low_ids]
    return low, rest


@contextlib.contextmanager
def _no_cuda_sync_without_cuda() -> Iterator[None]:
    """``torch.cuda.synchronize`` as a no-op while no CUDA device exists (there is nothing
    to wait for; torch's CPU build raises instead)."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize
    torch.cuda.synchronize = lambda device=None: None
    try:
        yield
    finally:
        torch.cuda.synchronize = saved


def _qgalore_class() -> type:
    """q-galore-torch 1.0's ``QGaLoreAdamW8bit``, adapted to bitsandbytes >= 0.45.

    q-galore-torch 1.0 targets bitsandbytes 0.43. Against the installed 0.50.2 its step
    fails with ``KeyError: 'percentile_clipping'``, for four API changes in bitsandbytes:

    1. ``Optimizer2State.__init__`` dropped ``percentile_clipping`` and ``block_wise``.
       q-galore passes them by position, so its 100 and True land in ``max_unorm`` and
       ``skip_zeros``. That would turn on update-norm clipping and zero skipping.
    2. ``get_config`` no longer fills ``percentile_clipping``/``block_wise``, which
       q-galore's ``update_step`` reads.
    3. ``optimizer_update_32bit`` and ``optimizer_update_8bit_blockwise`` gained
       ``beta3``/``alpha`` in the middle of their positional parameters, so q-galore's
       calls would pass ``eps`` as ``beta3``, and so on.
    4. Its ``step`` calls ``torch.cuda.synchronize()`` after every parameter, which
       raises on a CPU-only torch.

    The shim restores the settings q-galore asks for (``max_unorm=0``,
    ``skip_zeros=False``; its ``percentile_clipping=100`` means no clipping and
    ``block_wise=True`` is the only 8-bit mode bitsandbytes still has). It runs the
    installed bitsandbytes' own ``Optimizer2State.update_step``: the same blockwise
    8-bit Adam update, ``gnorm_scale = 1``, that q-galore's version calls. Outside CUDA,
    ``torch.cuda.synchronize`` is a no-op during the step. q-galore's projection, int4
    basis, adaptive gap and back-projection run unchanged. Only float gradients are
    supported: the Int8 weights' ``float_grad`` path is not used by this bench.
    """
    from bitsandbytes.optim.optimizer import Optimizer2State
    from q_galore_torch import QGaLoreAdamW8bit

    class QGaLoreAdamW8bitShim(QGaLoreAdamW8bit):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.args.max_unorm = 0.0
            self.args.skip_zeros = False

        def update_step(self, group: dict, p: torch.Tensor, gindex: int, pindex: int,
                        flag_use_float_grad: bool = False) -> None:
            if flag_use_float_grad:
                raise NotImplementedError("q-galore-torch shim: INT8 weights (float_grad) are not supported")
            Optimizer2State.update_step(self, group, p, gindex, pindex)

        def step(self, *args: Any, **kwargs: Any) -> Any:
            with _no_cuda_sync_without_cuda():
                return super().step(*args, **kwargs)

    return QGaLoreAdamW8bitShim


def optimizers(wl: TrainWorkload) -> dict[str, Callable[[torch.nn.Module], Any]]:
    """``{label: make(model)}`` for every optimiser of the training workload."""
    from svdkernels.testing.llama import LLAMA_TARGETS

    def ours(cls: type, **kw: Any) -> Callable[[torch.nn.Module], Any]:
        def make(model: torch.nn.Module) -> Any:
            groups = lowrank_param_groups(model, LLAMA_TARGETS, rank=wl.rank, update_gap=wl.gap, scale=0.25)
            return cls(groups, lr=wl.lr, **kw)
        return make

    def galore(model: torch.nn.Module) -> Any:
        from galore_torch import GaLoreAdamW

        low, rest = _split(model)
        return GaLoreAdamW([dict(params=rest), _galore_group(low, wl.rank, wl.gap)], lr=wl.lr)

    def qgalore(model: torch.nn.Module) -> Any:
        low, rest = _split(model)
        group = _galore_group(low, wl.rank, wl.gap, quant=True, quant_n_bit=4, quant_group_size=256,
                              cos_threshold=0.4, gamma_proj=2, queue_size=5)
        # q-galore-torch 1.0 was written against an older bitsandbytes: _qgalore_class
        # adapts it to the installed one without changing what it computes.
        return _qgalore_class()([dict(params=rest), group], lr=wl.lr)

    def apollo(model: torch.nn.Module) -> Any:
        from apollo_torch import APOLLOAdamW

        low, rest = _split(model)
        group = dict(params=low, rank=wl.rank, proj="random", scale_type="channel", scale=1,
                     update_proj_gap=wl.gap, proj_type="std")
        return APOLLOAdamW([dict(params=rest), group], lr=wl.lr)

    return {
        "ours: LowRankAdamW rsvd, rotate": ours(LowRankAdamW, projector="rsvd", moments="rotate"),
        "ours: DCTAdamW": ours(DCTAdamW),
        "ours: QGaLoreAdamW (int4 basis, adaptive gap)": ours(QGaLoreAdamW),
        "torch.optim.AdamW": lambda model: torch.optim.AdamW(model.parameters(), lr=wl.lr),
        "galore-torch GaLoreAdamW": galore,
        "q-galore-torch QGaLoreAdamW8bit": qgalore,
        "apollo-torch APOLLOAdamW": apollo,
    }


def _tensor_bytes(obj: Any, seen: set[int], depth: int = 0) -> int:
    """Bytes of the tensors inside an optimiser state value (projector objects included)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if depth > 3:
        return 0
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


def state_bytes(opt: Any) -> int:
    """Optimiser-state bytes: ours report their own (bases gathered between refreshes
    included); peers' states are walked, their projector objects' tensors included."""
    if isinstance(opt, LowRankAdamW):
        return opt.state_bytes()
    seen: set[int] = set()
    return sum(_tensor_bytes(st, seen) for st in opt.state.values())


def projected_state_bytes(opt: Any, model: torch.nn.Module) -> int:
    """Optimiser-state bytes of the projected weights alone (attention and MLP), where the
    low-rank methods differ from AdamW; the embeddings' plain-Adam state is the same in all."""
    low, _ = _split(model)
    seen: set[int] = set()
    total = sum(_tensor_bytes(opt.state[p], seen) for p in low if p in opt.state)
    if isinstance(opt, LowRankAdamW):
        total += sum(t.numel() * t.element_size() for p, t in opt._cache.items() if any(p is q for q in low))
    return total


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    """Silence file descriptors 1 and 2 (the profiler's C++ start/stop lines, which no
    Python setting reaches) while the block runs."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak of the memory allocated during ``fn()`` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fds(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    running = peak = 0
    for e in events:
        running += e.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


@dataclass
class _Result:
    losses: list[float]
    step_ms: float
    opt_ms: float
    refresh_ms: Optional[float]
    state: int
    projected_state: int
    peak: int
    peak_layerwise: Optional[int]
    heldout: float


def _refresh_ms(opt: Any, model: torch.nn.Module) -> Optional[float]:
    """The refresh alone, on the current gradients: ours batched; galore-torch's per matrix."""
    if isinstance(opt, LowRankAdamW):
        t0 = time.perf_counter()
        opt.refresh()
        return (time.perf_counter() - t0) * 1e3
    if type(opt).__module__.startswith("galore_torch"):
        from galore_torch.galore_projector import GaLoreProjector

        low, _ = _split(model)
        projector = GaLoreProjector(1, proj_type="std")
        t0 = time.perf_counter()
        for p in low:
            r = opt.param_groups[1]["rank"]
            projector.get_orthogonal_matrix(p.grad, r, "right" if p.shape[0] >= p.shape[1] else "left")
        return (time.perf_counter() - t0) * 1e3
    return None


def _train(label: str, make: Callable[[torch.nn.Module], Any], wl: TrainWorkload, train_blocks: torch.Tensor,
           heldout_blocks: torch.Tensor, device: torch.device) -> _Result:
    from svdkernels.testing.llama import heldout_loss, lm_loss, small_llama

    model = small_llama(hidden=wl.hidden, intermediate=wl.intermediate, layers=wl.layers, heads=wl.heads,
                        seed=0).to(device)
    opt = make(model)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(train_blocks.shape[0], generator=g)
    losses, times, opt_times = [], [], []

    def batch_at(i: int) -> torch.Tensor:
        idx = order[(i * wl.batch) % len(order):][: wl.batch]
        return train_blocks[idx].to(device)

    def step(i: int) -> float:
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, batch_at(i))
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        opt_times.append(time.perf_counter() - t0)
        return float(loss)

    for i in range(wl.steps):
        t0 = time.perf_counter()
        losses.append(step(i))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # The last full refresh period (it contains one refresh step).
    period = times[-wl.gap:] if wl.steps >= wl.gap else times
    opt_period = opt_times[-wl.gap:] if wl.steps >= wl.gap else opt_times
    heldout = heldout_loss(model, heldout_blocks)
    # Refresh alone and memory, measured after the run and its held-out loss.
    opt.zero_grad(set_to_none=True)
    lm_loss(model, batch_at(wl.steps)).backward()
    refresh = _refresh_ms(opt, model)
    state = state_bytes(opt)
    projected = projected_state_bytes(opt, model)
    opt.zero_grad(set_to_none=True)
    peak = peak_bytes(lambda: step(wl.steps + 1), device)
    peak_lw = None
    if isinstance(opt, LowRankAdamW):
        opt.zero_grad(set_to_none=True)
        handle = layerwise(model, opt)
        peak_lw = peak_bytes(lambda: lm_loss(model, batch_at(wl.steps + 2)).backward(), device)
        handle.remove()
    return _Result(losses, sum(period) / len(period) * 1e3, sum(opt_period) / len(opt_period) * 1e3, refresh, state, projected, peak, peak_lw, heldout)


def plot_losses(rows: Sequence[Row], path: Path) -> bool:
    """The training-loss curves of every optimiser that ran (``OUT/optim.png``, the
    runner's per-family picture); False without matplotlib or curves."""
    curves = {r.method: r.extra["losses"] for r in rows if r.extra.get("losses")}
    if not curves:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(next(r.workload for r in rows if r.extra.get("losses")), fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def _train_rows(quick: bool, wl: Optional[TrainWorkload] = None) -> Iterator[Row | str]:
    from svdkernels.testing.llama import token_blocks

    wl = wl or train_workload(quick)
    device = bench_device()
    train_blocks = token_blocks("train", wl.seq_len)
    heldout_blocks = token_blocks("heldout", wl.seq_len, max_blocks=wl.heldout_blocks)
    name = wl.name
    results: dict[str, Optional[_Result]] = {}
    errors: dict[str, str] = {}
    for label, make in optimizers(wl).items():
        yield name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[label] = _train(label, make, wl, train_blocks, heldout_blocks, device)
        except Exception as e:  # a peer that does not import or run here: reported, not fatal
            results[label] = None
            errors[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    galore = results.get("galore-torch GaLoreAdamW")
    for label, res in results.items():
        kind = "ours" if label.startswith("ours: LowRankAdamW") else "peer"
        if res is None:
            yield Row(name, label, None, kind=kind, note=f"did not run here: {errors[label]}")
            continue
        errs = {"opt.step ms": res.opt_ms, "refresh ms": res.refresh_ms if res.refresh_ms is not None else float("nan"),
                "state MB": res.state / 1e6, "proj. state MB": res.projected_state / 1e6, "peak MB": res.peak / 1e6, "heldout loss": res.heldout}
        if galore is not None:
            errs["loss/galore"] = res.heldout / galore.heldout
        note = f"peak with layerwise: {res.peak_layerwise / 1e6:.1f} MB" if res.peak_layerwise is not None else ""
        yield Row(name, label, res.step_ms, kind=kind, errors=errs, note=note,
                  extra={"losses": res.losses})


LEGEND = (
    "refresh: energy/exact = captured gradient energy ||proj(G)||/||G|| over the exact SVD's, worst over the "
    "block (target: ours >= 0.99 and >= 5x faster than galore-torch). training: time = mean step (fwd+bwd+opt) "
    "over the last refresh period (opt.step ms: the optimiser alone); refresh ms = the refresh alone on one step's gradients; state MB = optimiser "
    "state (proj. state: of the projected weights alone); peak MB = allocations above the model during one step (CPU: profiler); loss/galore = held-out loss "
    "over galore-torch's (target within 1%)."
)


@register("optim", count=lambda quick: 1 + len(optimizers(train_workload(quick))), legend=LEGEND,
          plot=plot_losses)
def bench_optim(quick: bool, repeats: int) -> Iterator[Row | str]:
    """The projector refresh of a 7B block (quarter width) and a 20M Llama training run."""
    yield from _refresh_rows(quick, repeats)
    yield from _train_rows(quick)
