"""Rows of the ``distributed`` bench family for the optimiser (issue 14): one
:class:`~svdkernels.train.LowRankAdamW` step with a basis refresh of the small Llama
under FSDP2 on 1, 2 and 4 processes (gloo on loopback, one thread each), beside the
same step in one process without FSDP.

Per world size: the step time (median over ``repeats`` steps that all refresh, a warm
start after the first; the slowest rank's, between barriers) and the first (cold, rsvd
from scratch) refresh step; the optimiser's bytes all-reduced per rank in one step
(counted by wrapping ``torch.distributed.all_reduce``: FSDP's own all-gathers and
reduce-scatters are not in it); the state held per rank, split into the moments
(sharded like the weights) and the rest (replicated bases; the plain AdamW moments of
the embeddings and norms, also sharded); and the step's working peak beyond its
inputs (:class:`svdkernels.bench.distributed.LiveBytes`). Target: the state per rank
at most ``1/N`` of one process's plus the bases.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import torch

from svdkernels.bench import Row

LEGEND = ("optimiser step with refresh of the small Llama under FSDP2 (gloo, 1 thread per process): "
          "time = median step that refreshes every time (warm start), cold = the first step (rsvd from scratch); "
          "comm = bytes the optimiser all-reduces per rank and step; state = MiB held per rank (moments | rest); "
          "max|ΔW| vs 1 proc: one weight after the steps against the single-process run, relative to its largest "
          "entry. 4 processes on fewer cores time the cores, not the algorithm.")


def config(quick: bool) -> dict:
    """The small Llama and the optimiser options (quick: a 2-layer, 64-wide model)."""
    if quick:
        return dict(hidden=64, intermediate=172, layers=2, heads=2, rank=16, batch=4, seq_len=32)
    return dict(hidden=256, intermediate=688, layers=4, heads=4, rank=64, batch=8, seq_len=128)


def _state_split(opt) -> tuple[int, int]:
    from svdkernels.train.distributed import local

    moments = rest = 0
    for st in opt.state.values():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                t = local(v)
                if key.startswith("exp_avg"):
                    moments += t.numel() * t.element_size()
                else:
                    rest += t.numel() * t.element_size()
    return moments, rest


def _optim_worker(rank: int, world: int, cfg: dict, repeats: int, sharded: bool) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from svdkernels.bench.distributed import LiveBytes
    from svdkernels.testing import llama
    from svdkernels.train import LowRankAdamW, lowrank_param_groups

    model = llama.small_llama(hidden=cfg["hidden"], intermediate=cfg["intermediate"], layers=cfg["layers"],
                              heads=cfg["heads"], seed=0)
    if sharded:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    # update_gap=1: every step refreshes (the first from scratch, then warm-started).
    opt = LowRankAdamW(lowrank_param_groups(model, targets=llama.LLAMA_TARGETS, rank=cfg["rank"], update_gap=1,
                                            side="right"), lr=1e-3)
    blocks = llama.token_blocks("train", cfg["seq_len"], max_blocks=cfg["batch"])
    per = cfg["batch"] // world
    batch = blocks[rank * per:(rank + 1) * per]
    sent: list[int] = []
    real = dist.all_reduce

    def counting(t, *args, **kwargs):
        sent.append(t.numel() * t.element_size())
        return real(t, *args, **kwargs)

    times, peak = [], 0
    for i in range(repeats + 1):
        opt.zero_grad()
        llama.lm_loss(model, batch).backward()
        dist.barrier()
        sent.clear()
        dist.all_reduce = counting
        try:
            with LiveBytes() as mem:
                t0 = time.perf_counter()
                opt.step()
                dist.barrier()
                times.append(time.perf_counter() - t0)
        finally:
            dist.all_reduce = real
        peak = max(peak, mem.peak)
    moments, rest = _state_split(opt)
    # Accuracy beside the time: one weight after the steps, gathered (after timing) to
    # compare with the single-process run.
    w = model.model.layers[0].self_attn.q_proj.weight.detach()
    w = w.full_tensor() if hasattr(w, "full_tensor") else w.clone()
    return {"cold_s": times[0], "time_s": statistics.median(times[1:]), "comm": sum(sent),
            "moments": moments, "rest": rest, "peak": peak, "weight": w}


def measure(world: int, quick: bool, repeats: int, sharded: bool = True) -> list[dict]:
    """Every rank's result of :func:`_optim_worker` (the slowest rank is taken for time)."""
    from svdkernels.testing.distributed import run_distributed

    return run_distributed(_optim_worker, world, config(quick), repeats, sharded, timeout=900, threads=1)


def optim_rows(quick: bool, repeats: int) -> Iterator[Row | str]:
    """One row per setting: 1 process without FSDP, then FSDP2 on 1, 2 and 4 processes
    (quick: FSDP2 on 2 only)."""
    cfg = config(quick)
    workload = f"llama h{cfg['hidden']} L{cfg['layers']} r{cfg['rank']} step+refresh"
    yield LEGEND
    base = None
    # quick (the test suite's smoke run): one sharded setting; 4 processes on 2 cores
    # cost the smoke run a minute and time nothing.
    settings = ((1, False), (2, True)) if quick else ((1, False), (1, True), (2, True), (4, True))
    for world, sharded in settings:
        res = measure(world, quick, repeats, sharded)
        worst = max(res, key=lambda r: r["time_s"])
        state = max(r["moments"] + r["rest"] for r in res)
        if base is None:
            base = res[0]
        extra = {"world": world, "cold_ms": max(r["cold_s"] for r in res) * 1e3,
                 "comm_kib_per_rank": max(r["comm"] for r in res) / 2**10,
                 "moments_mib_per_rank": max(r["moments"] for r in res) / 2**20,
                 "rest_mib_per_rank": max(r["rest"] for r in res) / 2**20,
                 "state_mib_per_rank": state / 2**20,
                 "state_vs_1proc": state / (base["moments"] + base["rest"]),
                 "step_peak_mib": max(r["peak"] for r in res) / 2**20}
        diff = float((res[0]["weight"] - base["weight"]).abs().max() / base["weight"].abs().max())
        yield Row(workload=workload, method=f"{'FSDP2' if sharded else 'no FSDP'} {world} proc",
                  time_ms=worst["time_s"] * 1e3, kind="ours", errors={"max|ΔW| vs 1 proc": diff},
                  note=f"state {extra['state_mib_per_rank']:.2f} MiB/rank ({extra['state_vs_1proc']:.2f}x 1 proc)",
                  extra=extra)
