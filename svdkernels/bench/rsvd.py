"""Benchmark family ``rsvd``: batched randomized SVD against its peers.

Workloads are batches of matrices with a known spectrum (polynomial decay, from
:func:`svdkernels.testing.matrices.spectral_matrix`), so each method's error is
compared with the optimal rank-k error. For each workload, in the same run:

- ours: ``svdkernels.rsvd(A, k, seed=0)`` at its defaults (oversample 10, 2 power iterations);
  on the CPU that is the C++ op (``csrc/cpu/rsvd.cpp``) when the extension is built, and
  then the same call on the reference backend is a row of its own;
- peers: ``torch.svd_lowrank`` and scikit-learn ``randomized_svd`` at the same
  oversampling and iterations; for the adapter-init workload, PEFT's PiSSA
  initialisations (``torch.svd_lowrank`` with ``niter=4``, and ``torch.linalg.svd``),
  one layer at a time as PEFT does;
- "bare products": only the products with ``A`` that our algorithm performs
  (:func:`svdkernels.reference.rsvd.plan_passes`), at their dtypes, on pre-cast
  operands: how far ours is from doing nothing but its unavoidable GEMMs; and the
  same number of float32 products;
- a roofline line: ``A`` read once per pass, ``2·m·n·width`` FLOPs per pass.

Then the drop-in rows (issue 18), each against ``torch.svd_lowrank`` in the same run:

- sparse ``A`` (COO; the same tensor for both, power-law row/column scales so the
  spectrum decays): errors against a float64 block-Krylov reference;
- float64 ``A`` (ours in float64: Householder QR, direct small SVD);
- the accuracy modes: block Krylov and dashSVD's shifted power iteration
  (``method="dash"``) against HMT and torch at equal passes over ``A``, on polynomial
  decay d = 0.5 and 1 and on the real all-MiniLM-L6-v2 weights (one batch per shape).

The workload definitions and method callables here are reused by ``bench/bench_rsvd.py``.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import svdkernels
from svdkernels.backends import select_backend, use_backend
from svdkernels.bench import Row, bench_device, device_peaks, register, roofline_row, time_fn
from svdkernels.reference import rsvd as reference
from svdkernels.testing.matrices import relative_errors, spectral_matrix

OVERSAMPLE = 10
N_ITER = 2
# scikit-learn loops over the batch in Python: when a whole batch would take longer
# than this per timed call, time a prefix of the batch and scale up linearly.
SKLEARN_BUDGET_S = 1.0

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U [B,m,k], S [B,k], Vh [B,k,n]


@dataclass(frozen=True)
class Group:
    """``batch`` matrices of shape ``m x n``: one batched call of ours."""

    batch: int
    m: int
    n: int

    def __str__(self) -> str:
        return f"[{self.batch},{self.m},{self.n}]"


@dataclass(frozen=True)
class Workload:
    """Matrices (one or more same-shape groups) to factor at rank ``rank``.

    ``decay`` is the polynomial decay of the spectrum (``σ_i = (i+1)^-decay``);
    ``peers`` name entries of :data:`METHODS`; ``mean_over_layers`` reports the
    mean error ratio over matrices instead of the max (adapter init cares about
    the whole block).
    """

    name: str
    groups: tuple[Group, ...]
    rank: int
    peers: tuple[str, ...]
    decay: float = 1.0
    mean_over_layers: bool = False
    seed: int = 0


BATCH_PEERS = ("torch.svd_lowrank", "sklearn randomized_svd")
ADAPTER_PEERS = ("peft pissa_niter_4", "peft pissa")


def _batched(batch: int, m: int, n: int, rank: int) -> Workload:
    return Workload(f"[{batch},{m},{n}] k={rank}", (Group(batch, m, n),), rank, BATCH_PEERS)


def _adapter_block(width: int, ffn: int, rank: int, name: str) -> Workload:
    # One Llama decoder block: q,k,v,o [width, width], gate/up [ffn, width],
    # down [width, ffn], grouped by shape into three batched calls.
    groups = (Group(4, width, width), Group(2, ffn, width), Group(1, width, ffn))
    return Workload(name, groups, rank, ADAPTER_PEERS, decay=0.5, mean_over_layers=True, seed=100)


def workloads(quick: bool) -> list[Workload]:
    """The family's workloads; ``quick`` shrinks them so the whole family takes seconds."""
    if quick:
        return [_batched(2, 256, 256, 8), _adapter_block(256, 688, 8, "adapter init 1/16-Llama-7B block k=8")]
    return [
        _batched(16, 1024, 1024, 32),
        _batched(4, 2048, 2048, 64),
        _batched(64, 512, 512, 16),
        # Llama-7B (4096 wide, FFN 11008) at quarter width.
        _adapter_block(1024, 2752, 16, "adapter init 1/4-Llama-7B block k=16"),
    ]


@dataclass
class Matrices:
    """A workload's matrices: ``A`` (float32, on the bench device) for the methods,
    ``A64`` (float64, CPU) and exact spectra ``S`` for the errors; one per group."""

    A: list[torch.Tensor]
    A64: list[torch.Tensor]
    S: list[torch.Tensor]


@functools.lru_cache(maxsize=1)
def matrices(workload: Workload, device: str = "cpu") -> Matrices:
    """Build (once: Haar factors in float64 take seconds) a workload's matrices."""
    A, A64, S = [], [], []
    for i, g in enumerate(workload.groups):
        M = spectral_matrix("poly", g.m, g.n, batch=(g.batch,), decay=workload.decay, seed=workload.seed + i)
        A.append(M.A.to(device=device, dtype=torch.float32))
        A64.append(M.A)
        S.append(M.S)
    return Matrices(A, A64, S)


# ---------------------------------------------------------------------------
# Methods: each maps (inputs, rank) to one Factors per group.


def run_ours(mats: Sequence[torch.Tensor], k: int) -> list[Factors]:
    """``svdkernels.rsvd`` once per group, at its default oversampling and iterations."""
    return [svdkernels.rsvd(A, k, seed=0) for A in mats]


def run_ours_reference(mats: Sequence[torch.Tensor], k: int) -> list[Factors]:
    """:func:`run_ours` on the reference backend (torch products and LAPACK calls)."""
    with use_backend("reference"):
        return run_ours(mats, k)


def run_svd_lowrank(mats: Sequence[torch.Tensor], k: int) -> list[Factors]:
    """``torch.svd_lowrank`` on the whole batch, same oversampling and iterations as ours."""
    out = []
    for A in mats:
        U, S, V = torch.svd_lowrank(A, q=k + OVERSAMPLE, niter=N_ITER)
        out.append((U[..., :k], S[..., :k], V[..., :k].mT))
    return out


def _per_layer(mats: Sequence[torch.Tensor], one: Callable[[torch.Tensor], Factors]) -> list[Factors]:
    out = []
    for A in mats:
        parts = [one(W) for W in A.unbind(0)]
        out.append(tuple(torch.stack(p) for p in zip(*parts)))
    return out


def run_pissa_niter_4(mats: Sequence[torch.Tensor], k: int) -> list[Factors]:
    """PEFT ``init_lora_weights="pissa_niter_4"``: ``svd_lowrank(W, q=k, niter=4)`` per layer."""

    def one(W: torch.Tensor) -> Factors:
        U, S, V = torch.svd_lowrank(W, q=k, niter=4)
        return U, S, V.mT

    return _per_layer(mats, one)


def run_pissa(mats: Sequence[torch.Tensor], k: int) -> list[Factors]:
    """PEFT ``init_lora_weights="pissa"``: full ``torch.linalg.svd`` per layer, truncated."""

    def one(W: torch.Tensor) -> Factors:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k]

    return _per_layer(mats, one)


def run_sklearn(mats: Sequence[Any], k: int) -> list[Factors]:
    """scikit-learn ``randomized_svd`` looped over each batch (it takes one matrix)."""
    from sklearn.utils.extmath import randomized_svd

    out = []
    for batch in mats:
        parts = [
            randomized_svd(M, k, n_oversamples=OVERSAMPLE, n_iter=N_ITER, random_state=0)
            for M in batch
        ]
        out.append(tuple(torch.stack([torch.from_numpy(p[j]) for p in parts]) for j in range(3)))
    return out


def _to_numpy(mats: Sequence[torch.Tensor]) -> list[Any]:
    return [A.cpu().numpy() for A in mats]


@dataclass(frozen=True)
class Method:
    """A timed method: ``run(prepare(A), k)``; ``prepare`` runs outside the timed region."""

    name: str
    run: Callable[[Sequence[Any], int], list[Factors]]
    kind: str = "peer"
    prepare: Callable[[Sequence[torch.Tensor]], Sequence[Any]] = list
    note: str = ""
    subset: bool = False  # slow Python loop over matrices: may be timed on a prefix
    host: bool = False  # runs on the CPU whatever the bench device: time it with the CPU clock


OURS = "ours (svdkernels.rsvd)"
OURS_REFERENCE = "ours, reference backend"
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(OURS, run_ours, kind="ours"),
        Method(OURS_REFERENCE, run_ours_reference,
               note="the same algorithm in torch calls (what CPU calls ran before the C++ op)"),
        Method("torch.svd_lowrank", run_svd_lowrank, note=f"q=k+{OVERSAMPLE}, niter={N_ITER}, batched"),
        Method(
            "sklearn randomized_svd",
            run_sklearn,
            prepare=_to_numpy,
            note=f"n_oversamples={OVERSAMPLE}, n_iter={N_ITER}, loop over batch",
            subset=True,
            host=True,
        ),
        Method("peft pissa_niter_4", run_pissa_niter_4, note="torch.svd_lowrank(W, q=k, niter=4) per layer"),
        Method("peft pissa", run_pissa, note="torch.linalg.svd(W) per layer"),
    )
}
BARE = "bare products"
FP32 = "fp32 products"


def accuracy(workload: Workload, mats: Matrices, factors: Sequence[Factors]) -> dict[str, float]:
    """``err/opt`` (max over matrices, or mean for adapter init), ``sv err`` and ``orth`` (max).

    ``factors`` may cover only a prefix of each group (a subset-timed method).
    """
    parts = []
    for A64, S_true, (U, S, Vh) in zip(mats.A64, mats.S, factors):
        b = U.shape[0]
        parts.append(relative_errors(A64[:b], U.cpu(), S.cpu(), Vh.cpu(), S_true[:b]))
    ratio = torch.cat([p["ratio"] for p in parts])
    return {
        "err/opt": float(ratio.mean() if workload.mean_over_layers else ratio.max()),
        "sv err": float(torch.cat([p["sv"] for p in parts]).max()),
        "orth": float(torch.cat([p["orth"] for p in parts]).max()),
    }


def _prefix(mats: Sequence[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The first ``count`` matrices, taken group by group."""
    out = []
    for A in mats:
        take = min(A.shape[0], count)
        if take:
            out.append(A[:take])
        count -= take
    return out


def measure(method: Method, workload: Workload, mats: Matrices, repeats: int) -> Row:
    """Time ``method`` on the workload (median of ``repeats``) and measure its accuracy."""
    k = workload.rank
    A = mats.A
    clock = torch.device("cpu") if method.host else None
    total = sum(a.shape[0] for a in A)
    note = [method.note] if method.note else []
    used = total
    if method.subset and total > 1:
        one = method.prepare(_prefix(A, 1))
        t1, _ = time_fn(lambda: method.run(one, k), repeats=1, device=clock)
        if t1 * total > SKLEARN_BUDGET_S:
            used = max(1, min(total, math.floor(SKLEARN_BUDGET_S / t1)))
            A = _prefix(A, used)
            note.append(f"timed on {used} of {total} matrices, scaled x{total / used:.3g}")
    inputs = method.prepare(A)
    torch.manual_seed(0)  # torch.svd_lowrank draws from the global generator
    t, factors = time_fn(lambda: method.run(inputs, k), repeats=repeats, device=clock)
    return Row(
        workload.name,
        method.name,
        t * total / used * 1e3,
        kind=method.kind,
        errors=accuracy(workload, mats, factors),
        note="; ".join(note),
        extra={"matrices_timed": used, "matrices": total},
    )


# ---------------------------------------------------------------------------
# Bare products and the roofline


def pass_plan(device: torch.device) -> list[reference.PassSpec]:
    """The products with ``A`` our rsvd does for float32 input on ``device`` at defaults."""
    dtype = reference.working_dtype(torch.float32, device)
    sketch = reference.default_sketch_dtype(dtype, device)
    # The CPU reference runs its passes with torch.matmul; GPU kernels keep float32 accumulators.
    exact = device.type != "cpu" or reference.TORCH_PASSES.exact_16bit_products
    return reference.plan_passes(dtype, N_ITER, sketch, exact)


@dataclass(frozen=True)
class Product:
    """One pass of the plan, operands pre-cast: ``op(A)·X`` as our backend computes it."""

    A: torch.Tensor  # [B, m, n] in the pass dtype
    X: torch.Tensor  # [B, n or m, width] in the pass dtype (2·width when split)
    transpose: bool
    dtype: torch.dtype


def product_operands(
    mats: Sequence[torch.Tensor], rank: int, plan: Sequence[reference.PassSpec], *, fp32: bool = False
) -> list[Product]:
    """Pre-cast operands for every pass of ``plan`` on every group.

    ``X`` is random; ``fp32`` makes every product float32 and unsplit instead.
    """
    width = rank + OVERSAMPLE
    g = torch.Generator(device=mats[0].device).manual_seed(0)
    products = []
    for A in mats:
        cast: dict[torch.dtype, torch.Tensor] = {}
        for spec in plan:
            dtype = torch.float32 if fp32 else spec.dtype
            if dtype not in cast:
                cast[dtype] = A.to(dtype)
            rows = A.shape[-2] if spec.transpose else A.shape[-1]
            w = width * (2 if spec.split and not fp32 else 1)
            X = torch.randn(A.shape[0], rows, w, generator=g, device=A.device).to(dtype)
            products.append(Product(cast[dtype], X, spec.transpose, dtype))
    return products


def run_products(products: Sequence[Product]) -> list[torch.Tensor]:
    """The products themselves (what the bare rows time), through the CPU backend's own
    ``matmul`` so "bare" means exactly the products our rsvd does, done the same way
    (it computes Aᵀ·X as (Xᵀ·A)ᵀ, the faster orientation on the CPU)."""
    mm = reference.TORCH_PASSES.matmul
    return [mm(p.A, p.X, transpose=p.transpose, dtype=p.dtype) for p in products]


def pass_cost(
    groups: Sequence[Group], rank: int, plan: Sequence[reference.PassSpec]
) -> tuple[float, dict[torch.dtype, float]]:
    """Bytes (``A`` read once per pass at the pass dtype) and FLOPs per dtype
    (``2·m·n·width`` per pass and matrix) of ``plan`` over ``groups``."""
    width = rank + OVERSAMPLE
    bytes_moved = 0.0
    flops: dict[torch.dtype, float] = {}
    for g in groups:
        for spec in plan:
            size = g.batch * g.m * g.n
            bytes_moved += size * spec.dtype.itemsize
            w = width * (2 if spec.split else 1)
            flops[spec.dtype] = flops.get(spec.dtype, 0.0) + 2.0 * size * w
    return bytes_moved, flops


def _plan_summary(plan: Sequence[reference.PassSpec]) -> str:
    counts: dict[str, int] = {}
    for spec in plan:
        key = str(spec.dtype).removeprefix("torch.") + (" split" if spec.split else "")
        counts[key] = counts.get(key, 0) + 1
    return " + ".join(f"{n}x {key}" for key, n in counts.items())


def _product_rows(
    workload: Workload, mats: Matrices, plan: Sequence[reference.PassSpec], ours_ms: float, repeats: int
) -> Iterator[Row]:
    for name, fp32 in ((BARE, False), (FP32, True)):
        products = product_operands(mats.A, workload.rank, plan, fp32=fp32)
        t, _ = time_fn(lambda p=products: run_products(p), repeats=repeats)
        what = _plan_summary(plan) if not fp32 else f"{len(plan)}x float32"
        ms = t * 1e3
        yield Row(
            workload.name,
            name,
            ms,
            kind="bare",
            note=f"{what} matmuls per group; ours = {ours_ms / ms:.2f}x of this",
            extra={"ours_over_this": ours_ms / ms, "passes": len(plan)},
        )
        del products  # free this set of operands before building the next


# ---------------------------------------------------------------------------
# The family

LEGEND = (
    "err/opt = |A - U S Vh|_F / optimal rank-k error (max over the batch; mean over layers "
    "for adapter init). sv err = max relative error of the top k/2 singular values. "
    "orth = max(|U'U - I|_F, |Vh Vh' - I|_F).\n"
    "bare / fp32 products = only our passes' products with A, computed as our backend does (pre-cast operands); "
    "roofline = those passes at the device's peak FLOP/s and bandwidth.\n"
    "sparse rows: the optimal error and spectrum are estimated by a float64 block-Krylov run (n_iter 6, "
    "oversample 20); accuracy rows: equal passes over A for every method."
)


@register("rsvd", count=lambda quick: len(workloads(quick)) + len(variant_workloads(quick)), legend=LEGEND)
def bench_rsvd(quick: bool, repeats: int) -> Iterator[Row | str]:
    """Measure ours, each peer, the bare products and the roofline on every workload."""
    device = bench_device()
    peaks = device_peaks(device, quick)
    plan = pass_plan(device)
    for wl in workloads(quick):
        yield wl.name
        mats = matrices(wl, str(device))
        ours = measure(METHODS[OURS], wl, mats, repeats)
        notes = [] if hasattr(svdkernels, "rsvd") else ["svdkernels.rsvd absent: reference.rsvd"]
        cpp = device.type == "cpu" and select_backend("rsvd", device, has_cpp=True) == "cpp"
        if cpp:
            notes.append("C++ op (csrc/cpu/rsvd.cpp)")
        if len(wl.groups) > 1:
            notes.append(f"{len(wl.groups)} batched calls: " + ", ".join(map(str, wl.groups)))
        ours.note = "; ".join(notes)
        yield ours
        if cpp:
            yield measure(METHODS[OURS_REFERENCE], wl, mats, repeats)
        for peer in wl.peers:
            yield measure(METHODS[peer], wl, mats, repeats)
        yield from _product_rows(wl, mats, plan, ours.time_ms, repeats)
        bytes_moved, flops = pass_cost(wl.groups, wl.rank, plan)
        yield roofline_row(wl.name, ours.time_ms / 1e3, bytes_moved, flops, peaks)
    for v in variant_workloads(quick):
        yield v.name
        yield from _variant_rows(v, repeats, device)


# ---------------------------------------------------------------------------
# Drop-in rows (issue 18): sparse, float64, accuracy mode


@dataclass(frozen=True)
class Variant:
    """One drop-in workload: ``kind`` is ``"sparse"``, ``"float64"``, ``"accuracy"`` (poly
    decay ``decay``) or ``"minilm"`` (accuracy on the real weights; ``shape`` unused)."""

    kind: str
    name: str
    shape: tuple[int, ...]  # [m, n] (sparse) or [batch, m, n]
    rank: int
    density: float = 0.0
    n_iter: int = N_ITER
    decay: float = 0.5


def variant_workloads(quick: bool) -> list[Variant]:
    """The drop-in workloads; ``quick`` keeps each to about a second."""
    if quick:
        return [
            Variant("sparse", "sparse COO 4000x2000 density 2e-3 k=8", (4000, 2000), 8, 2e-3),
            Variant("float64", "float64 [2,192,192] k=8", (2, 192, 192), 8),
            Variant("accuracy", "accuracy [2,192,192] k=8 d=0.5, 6 passes", (2, 192, 192), 8, n_iter=2),
        ]
    return [
        Variant("sparse", "sparse COO 100000x50000 density 1e-3 k=16", (100_000, 50_000), 16, 1e-3),
        Variant("sparse", "sparse COO 20000x10000 density 1e-2 k=16", (20_000, 10_000), 16, 1e-2),
        Variant("sparse", "sparse COO 20000x10000 density 1e-3 k=16", (20_000, 10_000), 16, 1e-3),
        Variant("float64", "float64 [4,1024,1024] k=32", (4, 1024, 1024), 32),
        Variant("accuracy", "accuracy [8,1024,1024] k=32 d=0.5, 4 passes", (8, 1024, 1024), 32, n_iter=1),
        Variant("accuracy", "accuracy [8,1024,1024] k=32 d=0.5, 6 passes", (8, 1024, 1024), 32, n_iter=2),
        Variant("accuracy", "accuracy [8,1024,1024] k=32 d=0.5, 8 passes", (8, 1024, 1024), 32, n_iter=3),
        Variant("accuracy", "accuracy [8,1024,1024] k=32 d=1, 6 passes", (8, 1024, 1024), 32, n_iter=2, decay=1.0),
        Variant("accuracy", "accuracy [8,1024,1024] k=32 d=1, 8 passes", (8, 1024, 1024), 32, n_iter=3, decay=1.0),
        Variant("minilm", "accuracy MiniLM 37 weights k=32, 6 passes", (), 32, n_iter=2),
        Variant("minilm", "accuracy MiniLM 37 weights k=32, 8 passes", (), 32, n_iter=3),
    ]


def power_law_sparse(m: int, n: int, density: float, seed: int = 0) -> torch.Tensor:
    """Coalesced float32 COO ``[m, n]``: uniform positions, N(0, 1) values scaled by
    ``(i+1)^-½·(j+1)^-½`` (power-law degrees, as a user-item matrix), so the spectrum decays."""
    g = torch.Generator().manual_seed(seed)
    nnz = int(m * n * density)
    rows = torch.randint(0, m, (nnz,), generator=g)
    cols = torch.randint(0, n, (nnz,), generator=g)
    vals = torch.randn(nnz, generator=g) * ((rows + 1.0) * (cols + 1.0)).rsqrt() * math.sqrt(m)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (m, n), check_invariants=False).coalesce()


def sparse_errors(A: torch.Tensor, factors: Factors, ref: Factors) -> dict[str, float]:
    """``err/opt``, ``sv err`` and ``orth`` of a sparse factorisation, never densifying ``A``.

    No exact SVD of a 100000x50000 matrix: the optimal rank-k error and spectrum are
    those of ``ref``, a float64 block-Krylov factorisation (n_iter 6, oversample 20),
    whose error is within a hair of (and never below) the optimum.
    ``‖A − U S Vh‖_F² = ‖A‖_F² − 2·Σ s_i u_iᵀ A v_i + Σ s_i²`` for orthonormal ``U``, ``V``,
    in float64 (one sparse product per factorisation).
    """
    A64 = A.double()
    norm2 = float(A64.values().pow(2).sum())

    def err(f: Factors) -> float:
        U, S, Vh = (t.double() for t in f)
        AV = torch.sparse.mm(A64, Vh.mT.contiguous())  # [m, k]
        return math.sqrt(max(norm2 - 2 * float(((U * AV).sum(0) * S).sum()) + float(S.pow(2).sum()), 0.0))

    h = max(factors[1].shape[-1] // 2, 1)
    S_ref = ref[1].double()[:h]
    sv = float(((factors[1].double()[:h] - S_ref) / S_ref).abs().max())
    U, Vh = factors[0].double(), factors[2].double()
    eye = torch.eye(U.shape[-1], dtype=torch.float64, device=U.device)
    orth = max(float(torch.linalg.matrix_norm(U.mT @ U - eye)), float(torch.linalg.matrix_norm(Vh @ Vh.mT - eye)))
    return {"err/opt": err(factors) / err(ref), "sv err": sv, "orth": orth}


def _svd_lowrank_factors(A: torch.Tensor, k: int, niter: int) -> Factors:
    torch.manual_seed(0)  # torch.svd_lowrank draws from the global generator
    U, S, V = torch.svd_lowrank(A, q=k + OVERSAMPLE, niter=niter)
    return U[..., :k], S[..., :k], V[..., :k].mT


def _dense_errors(A64: torch.Tensor, S_true: torch.Tensor, f: Factors) -> dict[str, float]:
    e = relative_errors(A64, *(t.cpu() for t in f), S_true)
    return {"err/opt": float(e["ratio"].max()), "sv err": float(e["sv"].max()), "orth": float(e["orth"].max())}


def _variant_rows(v: Variant, repeats: int, device: torch.device) -> Iterator[Row]:
    k = v.rank
    if v.kind == "sparse":
        m, n = v.shape
        A = power_law_sparse(m, n, v.density).to(device)
        ref = svdkernels.rsvd(A.double(), k, oversample=20, n_iter=6, method="krylov", seed=1)
        reps = min(repeats, 3)  # seconds per call at full size
        t, f = time_fn(lambda: svdkernels.rsvd(A, k, seed=0), repeats=reps)
        yield Row(v.name, OURS, t * 1e3, kind="ours", errors=sparse_errors(A, f, ref),
                  note=f"oversample {OVERSAMPLE}, n_iter {N_ITER}; CSR copies of A and Aᵀ made inside",
                  extra={"nnz": A._nnz()})
        t, f = time_fn(lambda: _svd_lowrank_factors(A, k, N_ITER), repeats=reps)
        yield Row(v.name, "torch.svd_lowrank", t * 1e3, errors=sparse_errors(A, f, ref),
                  note=f"same COO tensor, q=k+{OVERSAMPLE}, niter={N_ITER}")
        return
    if v.kind == "minilm":
        yield from _minilm_accuracy_rows(v, repeats, device)
        return
    decay = v.decay if v.kind == "accuracy" else 1.0
    M = spectral_matrix("poly", v.shape[1], v.shape[2], batch=(v.shape[0],), decay=decay, seed=7)
    dtype = torch.float64 if v.kind == "float64" else torch.float32
    A = M.A.to(device=device, dtype=dtype)
    if v.kind == "float64":
        t, f = time_fn(lambda: svdkernels.rsvd(A, k, seed=0), repeats=repeats)
        yield Row(v.name, OURS, t * 1e3, kind="ours", errors=_dense_errors(M.A, M.S, f), note="float64 throughout")
        t, f = time_fn(lambda: _svd_lowrank_factors(A, k, N_ITER), repeats=repeats)
        yield Row(v.name, "torch.svd_lowrank", t * 1e3, errors=_dense_errors(M.A, M.S, f),
                  note=f"float64, q=k+{OVERSAMPLE}, niter={N_ITER}")
        return
    passes = 2 * v.n_iter + 2
    t, f = time_fn(lambda: svdkernels.rsvd(A, k, n_iter=v.n_iter, method="krylov", seed=0), repeats=repeats)
    yield Row(v.name, "ours, method='krylov'", t * 1e3, kind="ours", errors=_dense_errors(M.A, M.S, f),
              note=f"block Krylov, n_iter={v.n_iter}: {passes} passes, basis {(v.n_iter + 1) * (k + OVERSAMPLE)} columns")
    t, f = time_fn(lambda: svdkernels.rsvd(A, k, n_iter=v.n_iter, method="dash", seed=0), repeats=repeats)
    yield Row(v.name, "ours, method='dash'", t * 1e3, errors=_dense_errors(M.A, M.S, f),
              note=f"dashSVD shifted power iteration, n_iter={v.n_iter}: {passes} passes, basis {k + OVERSAMPLE} columns")
    t, f = time_fn(lambda: svdkernels.rsvd(A, k, n_iter=v.n_iter, seed=0), repeats=repeats)
    yield Row(v.name, "ours, method='hmt'", t * 1e3, errors=_dense_errors(M.A, M.S, f),
              note=f"subspace iteration, n_iter={v.n_iter}: {passes} passes")
    t, f = time_fn(lambda: _svd_lowrank_factors(A, k, v.n_iter), repeats=repeats)
    yield Row(v.name, "torch.svd_lowrank", t * 1e3, errors=_dense_errors(M.A, M.S, f),
              note=f"q=k+{OVERSAMPLE}, niter={v.n_iter}: {passes} passes")


def _minilm_accuracy_rows(v: Variant, repeats: int, device: torch.device) -> Iterator[Row]:
    """The accuracy modes on the 37 real all-MiniLM-L6-v2 weights, one batched call per shape:
    err/opt is the mean over the 37 weights (its max in the note), the time the sum of the calls."""
    from svdkernels.testing.models import minilm_linear_weights

    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for w in minilm_linear_weights().values():
        groups.setdefault(tuple(w.shape), []).append(w)
    mats = [torch.stack(ws).to(device) for ws in groups.values()]
    exact = [torch.linalg.svdvals(W.double()).cpu() for W in mats]
    k, passes = v.rank, 2 * v.n_iter + 2
    methods: list[tuple[str, Callable[[torch.Tensor], Factors]]] = [
        ("ours, method='krylov'", lambda W: svdkernels.rsvd(W, k, n_iter=v.n_iter, method="krylov", seed=0)),
        ("ours, method='dash'", lambda W: svdkernels.rsvd(W, k, n_iter=v.n_iter, method="dash", seed=0)),
        ("ours, method='hmt'", lambda W: svdkernels.rsvd(W, k, n_iter=v.n_iter, seed=0)),
        ("torch.svd_lowrank", lambda W: _svd_lowrank_factors(W, k, v.n_iter)),
    ]
    for i, (name, fn) in enumerate(methods):
        t, fs = time_fn(lambda fn=fn: [fn(W) for W in mats], repeats=repeats)
        ratios = torch.cat([relative_errors(W.cpu(), *(x.cpu() for x in f), S)["ratio"] for W, f, S in zip(mats, fs, exact)])
        yield Row(v.name, name, t * 1e3, kind="ours" if i == 0 else "peer",
                  errors={"err/opt": float(ratios.mean())},
                  note=f"{passes} passes; err/opt mean over {ratios.numel()} weights, max {float(ratios.max()):.5f}")
