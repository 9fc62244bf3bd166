"""Benchmark family ``distributed``: the sharded rsvd on 1, 2 and 4 processes (issue 14).

Each row is one clean function (``rsvd_rows``, ``threads_rows``, ``model_rows``) so a
row of another kind (an optimiser step) can be added beside them. Processes are
started by :func:`svdkernels.testing.distributed.run_distributed` (gloo on the
loopback interface, one thread each unless said otherwise). Per workload and world
size:

- time: median over ``repeats`` calls of ``rsvd_sharded`` on a row-sharded
  ``[m, n]`` (``Shard(-2)``), each call between two barriers, the slowest rank's;
- comm MiB/rank: the bytes one rank hands to ``all_reduce`` in one call, counted by
  wrapping ``torch.distributed.all_reduce``, and ``formula ok`` = 1 when the count
  equals :func:`~svdkernels.ops.rsvd_sharded.allreduce_bytes`;
- peak MiB/rank: the peak of the CPU tensors the first call creates (:class:`LiveBytes`),
  the largest over ranks: its working memory beyond the shard (shown beside it);
- S diff: ``max |S − S_1proc| / S_1proc[0]`` (the same seed on every world size).

Every rank builds only its own rows, block by block from the seed, so no process
ever holds the whole matrix. ``threads_rows``: 2 processes x 1 thread against 1
process x 2 threads on the same matrix (issue target: within 1.3x). ``model_rows``:
the communication of one call at 8..1024 ranks from the counted formula, with the
per-all-reduce latency ``α`` and the per-byte time ``β`` fitted on this machine's
loopback (ring all-reduce: ``2(N−1)/N`` of the payload on each link, ``2(N−1)``
latency steps).
"""
from __future__ import annotations

import functools
import math
import statistics
import time
import weakref
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from svdkernels.bench import Row, register

RANK, OVERSAMPLE, N_ITER, SEED = 64, 10, 2, 0
BLOCK = 256  # rows generated per seeded block: the matrix does not depend on the world size
LEGEND = ("comm MiB/rank: bytes handed to all_reduce per call (formula ok = 1: equals allreduce_bytes); "
          "peak MiB/rank: peak of the tensors one call creates (beyond the shard); S diff: vs 1 process, same seed. "
          "model rows: modelled time of one call's all-reduces at N ranks (ring; alpha, beta fitted on loopback). "
          "2 CPU cores shared with other jobs: times are noisy.")


def shapes(quick: bool) -> list[tuple[int, int, int]]:
    """``(m, n, rank)`` workloads (issue 14: [4096, 4096] and [16384, 1024] at rank 64)."""
    if quick:
        return [(512, 512, 16), (2048, 128, 16)]
    return [(4096, 4096, RANK), (16384, 1024, RANK)]


def local_rows(m: int, n: int, rank: int, world: int) -> torch.Tensor:
    """This rank's ``torch.chunk`` rows of the ``[m, n]`` test matrix, generated per
    ``BLOCK``-row block from its index (a decaying spectrum: Gaussian times a ramp)."""
    size = -(-m // world)
    start, stop = min(rank * size, m), min((rank + 1) * size, m)
    scale = torch.linspace(1.0, 0.01, n)
    parts = []
    for b in range(start // BLOCK, -(-stop // BLOCK)):
        g = torch.Generator().manual_seed(1000 + b)
        block = torch.randn(min(BLOCK, m - b * BLOCK), n, generator=g) * scale
        lo, hi = max(start, b * BLOCK) - b * BLOCK, min(stop, (b + 1) * BLOCK) - b * BLOCK
        parts.append(block[lo:hi])
    return torch.cat(parts) if parts else torch.empty(0, n)


def _rsvd_worker(rank: int, world: int, cases: list[tuple[int, int, int]], repeats: int) -> list[dict]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from svdkernels.ops.rsvd_sharded import allreduce_bytes, rsvd_sharded

    mesh = init_device_mesh("cpu", (world,))
    out = []
    for m, n, k in cases:
        A = DTensor.from_local(local_rows(m, n, rank, world), mesh, [Shard(0)], run_check=False,
                               shape=torch.Size((m, n)), stride=(n, 1))
        sent: list[int] = []
        real = dist.all_reduce

        def counting(t, *args, **kwargs):
            sent.append(t.numel() * t.element_size())
            return real(t, *args, **kwargs)

        dist.all_reduce = counting
        try:
            with LiveBytes() as mem:
                _, S, _ = rsvd_sharded(A, k, oversample=OVERSAMPLE, n_iter=N_ITER, seed=SEED)
        finally:
            dist.all_reduce = real
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            rsvd_sharded(A, k, oversample=OVERSAMPLE, n_iter=N_ITER, seed=SEED)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        width = min(k + OVERSAMPLE, m, n)
        out.append({"time_s": statistics.median(times), "bytes": sum(sent), "calls": len(sent),
                    "formula": allreduce_bytes(1, n, width, N_ITER), "peak_mib": mem.peak / 2**20,
                    "shard_mib": A.to_local().numel() * 4 / 2**20,
                    "S": S.to_local(), "alpha_beta": _loopback_cost(world)})
    return out


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the CPU tensors that ops create while the mode is on (a storage is
    counted once, from the op that creates it until its last tensor from those ops is
    freed; views and in-place results of tensors made before are not new memory): the
    working memory of a call beyond its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: not new memory.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if type(t) is torch.Tensor}
        for t in tree_leaves(out):
            if type(t) is torch.Tensor and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self._refs:
                    self._refs[key][0] += 1
                elif key in inputs:
                    continue
                else:
                    self._refs[key] = [1, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._drop, key)
        return out

    def _drop(self, key: int) -> None:
        ref = self._refs[key]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self._refs[key]


def _loopback_cost(world: int) -> tuple[float, float]:
    """``(α seconds per all-reduce, β seconds per byte)`` of this group: the median time
    of an 8-byte and of a 4 MiB all-reduce (``β`` from their difference)."""
    import torch.distributed as dist

    if world == 1:
        return 0.0, 0.0
    med = []
    for numel in (1, 1 << 20):
        t = torch.zeros(numel)
        ts = []
        for _ in range(5):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            ts.append(time.perf_counter() - t0)
        med.append(statistics.median(ts))
    return med[0], max(0.0, (med[1] - med[0]) / ((1 << 20) * 4))


@functools.lru_cache(maxsize=None)
def measure(world: int, threads: int, quick: bool, repeats: int) -> tuple[dict, ...]:
    """One launch of ``world`` processes x ``threads`` threads over every workload:
    per workload, rank 0's result with the slowest rank's time and the largest peak."""
    from svdkernels.testing.distributed import run_distributed

    results = run_distributed(_rsvd_worker, world, shapes(quick), repeats, timeout=600, threads=threads)
    out = []
    for i in range(len(results[0])):
        r = dict(results[0][i])
        r["time_s"] = max(res[i]["time_s"] for res in results)
        r["peak_mib"] = max(res[i]["peak_mib"] for res in results)
        out.append(r)
    return tuple(out)


def _name(m: int, n: int, k: int) -> str:
    return f"rsvd_sharded [{m},{n}] k={k}"


def worlds(quick: bool) -> tuple[int, ...]:
    """Process counts of the rsvd rows: 1, 2 and 4 (quick, the test suite's smoke run:
    1 and 2; four processes on two cores cost that run a quarter of its time)."""
    return (1, 2) if quick else (1, 2, 4)


def rsvd_rows(quick: bool, repeats: int) -> Iterator[Row | str]:
    """Sharded rsvd on 1, 2 and 4 processes (1 thread each) for every workload."""
    for world in worlds(quick):
        yield f"rsvd_sharded on {world} process(es)"
        one = measure(1, 1, quick, repeats)
        for i, ((m, n, k), res) in enumerate(zip(shapes(quick), measure(world, 1, quick, repeats))):
            S1 = one[i]["S"]
            yield Row(workload=_name(m, n, k), method=f"{world} proc x 1 thread", time_ms=res["time_s"] * 1e3,
                      kind="ours" if world == 1 else "peer",
                      errors={"comm MiB/rank": res["bytes"] / 2**20, "formula ok": float(res["bytes"] == res["formula"]),
                              "peak MiB/rank": res["peak_mib"], "shard MiB": res["shard_mib"], "S diff": float((res["S"] - S1).abs().max() / S1[0])},
                      note=f"{res['calls']} all-reduces", extra={"alpha_s": res["alpha_beta"][0],
                                                                 "beta_s_per_byte": res["alpha_beta"][1]})


def threads_rows(quick: bool, repeats: int) -> Iterator[Row | str]:
    """1 process x 2 threads against 2 processes x 1 thread (issue target: within 1.3x)."""
    yield "rsvd_sharded 1 process x 2 threads"
    for i, ((m, n, k), res) in enumerate(zip(shapes(quick), measure(1, 2, quick, repeats))):
        two = measure(2, 1, quick, repeats)[i]
        ratio = two["time_s"] / res["time_s"]
        yield Row(workload=_name(m, n, k) + " 2 cores", method="1 proc x 2 threads", time_ms=res["time_s"] * 1e3,
                  kind="ours", errors={"peak MiB/rank": res["peak_mib"]})
        yield Row(workload=_name(m, n, k) + " 2 cores", method="2 proc x 1 thread", time_ms=two["time_s"] * 1e3,
                  errors={"comm MiB/rank": two["bytes"] / 2**20, "peak MiB/rank": two["peak_mib"]},
                  note=f"{ratio:.2f}x of 1 proc x 2 threads (target <= 1.3x: {'met' if ratio <= 1.3 else 'missed'})")


def comm_model(payload: int, calls: int, ranks: int, alpha: float, beta: float) -> dict[str, float]:
    """One call's all-reduces at ``ranks`` ranks: ring all-reduce moves ``2(N−1)/N`` of the
    payload over each rank's link; latency ``2·ceil(log2 N)`` steps per all-reduce (tree
    or recursive doubling, what NCCL and gloo pick for small messages)."""
    wire = 2 * (ranks - 1) / ranks * payload
    return {"wire MiB/rank": wire / 2**20, "latency ms": calls * 2 * math.ceil(math.log2(ranks)) * alpha * 1e3,
            "bandwidth ms": wire * beta * 1e3}


def model_rows(quick: bool, repeats: int) -> Iterator[Row | str]:
    """The communication of one call at 8..1024 ranks, from the counted formula and the
    latency and per-byte cost measured on the largest run's loopback (4 processes; quick: 2)."""
    yield "communication model"
    for i, (m, n, k) in enumerate(shapes(quick)):
        world = worlds(quick)[-1]
        res = measure(world, 1, quick, repeats)[i]
        alpha, beta = res["alpha_beta"]
        for ranks in (8, 32, 128, 512, 1024):
            c = comm_model(res["formula"], res["calls"], ranks, alpha, beta)
            yield Row(workload=_name(m, n, k) + " model", method=f"{ranks} ranks",
                      time_ms=c["latency ms"] + c["bandwidth ms"], errors=c,
                      note=f"alpha {alpha * 1e6:.0f} us, beta {beta * 1e9:.2f} ns/B (loopback, {world} procs)")


@register("distributed", count=lambda quick: 14 if quick else 17, legend=LEGEND)  # the headings rows yield
def bench_distributed(quick: bool, repeats: int) -> Iterator[Row | str]:
    """The family: rsvd rows, the threads comparison, the communication model, and one
    LowRankAdamW step with refresh of the small Llama (``distributed_optim.py``)."""
    from svdkernels.bench.distributed_optim import optim_rows

    yield from rsvd_rows(quick, repeats)
    yield from threads_rows(quick, repeats)
    yield from model_rows(quick, repeats)
    yield from optim_rows(quick, repeats)
