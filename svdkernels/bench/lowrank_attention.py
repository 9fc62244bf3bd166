"""Benchmark family ``lowrank_attention``: decode over a low-rank KV cache (issue 5).

Decode workloads (CPU): one step (``B = 1``, ``Sq = 1``) of Llama-3-8B-shaped
attention, ``Hq = 32``, ``Hkv = 8``, ``d = 128``, over ``T`` in {4k, 16k, 32k}
cached tokens (quick: 2k) stored as latents of rank ``rk = rv = 256``
(Llama-3.1-8B's per-layer share of xKV's rank 512 + 768 for groups of 4 is 128 + 192;
256 is the issue's setting). Rows:

- ``dense SDPA fp32`` (peer): ``F.scaled_dot_product_attention`` (GQA) over the
  dense float32 cache of the same keys (RoPE applied) and values;
- ``ours absorbed``: :func:`svdkernels.lowrank_attention` with ``rope=None`` (keys
  without RoPE, MLA-style: attention over the latents);
- ``ours pre-RoPE``: with ``rope=RoPE(500000)``: keys reconstructed and rotated;
- ``ours absorbed, bf16 cache``: the absorbed mode on bfloat16 latents and bases;
- ``ours ... isa=<path>``: the C++ kernel forced onto each instruction-set path this
  CPU runs (AVX2, AVX-512; the default row is the best one);
- roofline rows: each mode's bytes and FLOPs per decode step at this CPU's limits
  (FLOPs at the measured float32 GEMM peak, bytes at the measured bandwidth) and at
  an H100's (bf16 caches there), against dense attention's.

Ragged workload (issue 19): one decode step of a batch of 4 sequences of different
lengths (32k, 28k, 12k and 3k of a 32k cache), ``cache_seqlens`` given. Peers:
``dense SDPA fp32, masked`` (one SDPA call over the padded dense cache with a
boolean mask, as a batch is served) and ``dense SDPA fp32, per sequence`` (one call
per sequence on its valid prefix, the least dense work); ``ours absorbed,
reference backend`` is the plain-PyTorch path (it masks a zero-filled copy of
``v_latent``).

``rel err``: against float64 attention over the same reconstructed keys and values
(with RoPE for the pre-RoPE mode and the peer; the bf16 row against the float32
latents, so it includes the rounding of the cache to bf16). ``cache`` in the note:
latents plus bases (the bases, ``(rk + rv)·Hkv·d`` per sequence, are what keeps
the total below the per-token 4x at short T).

MiniLM workload: the real-activations check of :mod:`svdkernels.kv.evaluate`
(all-MiniLM-L6-v2, per-layer SVD against xKV groups of 2 and 3 at equal latent
floats per token): attention-output error, key error and its ratio to the
Eckart–Young optimum, value error. No timing.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from svdkernels.backends import cpp_available, use_backend
from svdkernels.bench import Peaks, Row, device_peaks, register, roofline, roofline_row, table_peaks, time_fn
from svdkernels.ops import lowrank_attention_cpp
from svdkernels.ops.lowrank_attention import RoPE, lowrank_attention
from svdkernels.reference.lowrank_attention import apply_rope

CPU = torch.device("cpu")
ROPE = RoPE(theta=500000.0)
MINILM_TOKENS = 320
MINILM_RANKS = (4, 8, 16, 32)
MINILM_RANKS_QUICK = (8, 32)


@dataclass(frozen=True)
class Workload:
    """One decode step over ``T`` cached tokens."""

    T: int
    Hq: int = 32
    Hkv: int = 8
    d: int = 128
    rk: int = 256
    rv: int = 256

    @property
    def name(self) -> str:
        return f"decode T={self.T // 1024}k Hq{self.Hq}/Hkv{self.Hkv} d{self.d} r{self.rk}"


def workloads(quick: bool) -> list[Workload]:
    return [Workload(2048)] if quick else [Workload(T) for T in (4096, 16384, 32768)]


RAGGED_FRACTIONS = (1.0, 0.875, 0.375, 0.09375)
"""Valid lengths of the ragged batch, as fractions of T (32k: 32768, 28672, 12288, 3072)."""


def ragged_workload(quick: bool) -> Workload:
    return Workload(2048 if quick else 32768)


ISA_NAMES = {1: "avx2", 2: "avx512"}


def cpp_isas() -> list[int]:
    """The SIMD paths of the C++ kernel this CPU runs (none without the extension)."""
    if not cpp_available():
        return []
    import svdkernels._C  # noqa: F401

    return [i for i in ISA_NAMES if i <= min(2, torch.ops.svdkernels._cpp_best_isa())]


def cpp_call(c: "LatentCache", rope: RoPE | None, isa: int, seqlens: torch.Tensor | None = None,
             tensors: tuple[torch.Tensor, ...] | None = None) -> Callable[[], torch.Tensor]:
    """The C++ backend forced onto instruction set ``isa``."""
    q, Ck, Cv, Wk, Wv = tensors or (c.q, c.Ck, c.Cv, c.Wk, c.Wv)
    d = q.shape[-1]
    args = rope.op_args(d) if rope is not None else (False, 10000.0, 1.0, 0, 0)
    return lambda: lowrank_attention_cpp.lowrank_attention(q, Ck, Cv, Wk, Wv, seqlens, True, 1 / math.sqrt(d),
                                                           *args, isa=isa)[0]


@dataclass(frozen=True)
class LatentCache:
    """Latents and bases (float32) with keys of a realistic scale: ``K = C_k·W_k`` has
    entries of variance 1, so scores ``q·k/sqrt(d)`` are O(1)."""

    q: torch.Tensor  # [1, Hq, 1, d]
    Ck: torch.Tensor  # [1, T, rk]
    Cv: torch.Tensor  # [1, T, rv]
    Wk: torch.Tensor  # [rk, Hkv*d]
    Wv: torch.Tensor  # [rv, Hkv*d]


def make_cache(wl: Workload) -> LatentCache:
    g = torch.Generator().manual_seed(wl.T)
    n = wl.Hkv * wl.d
    return LatentCache(
        torch.randn(1, wl.Hq, 1, wl.d, generator=g),
        torch.randn(1, wl.T, wl.rk, generator=g),
        torch.randn(1, wl.T, wl.rv, generator=g),
        torch.randn(wl.rk, n, generator=g) / math.sqrt(wl.rk),
        torch.randn(wl.rv, n, generator=g) / math.sqrt(wl.rv),
    )


def dense_kv(c: LatentCache, wl: Workload, rope: RoPE | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense cache ``[1, Hkv, T, d]`` of the same keys (RoPE applied) and values."""
    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(1, wl.T, wl.Hkv, wl.d).transpose(1, 2).contiguous()

    K = heads(c.Ck.to(dtype) @ c.Wk.to(dtype))
    if rope is not None:
        K = apply_rope(K, torch.arange(wl.T), theta=rope.theta, scaling=rope.scaling, layout=0, rotary_dim=wl.d)
    return K, heads(c.Cv.to(dtype) @ c.Wv.to(dtype))


def exact(c: LatentCache, wl: Workload, rope: RoPE | None) -> torch.Tensor:
    """float64 attention of ``q`` over the reconstructed cache (SDPA's math in float64)."""
    K, V = dense_kv(c, wl, rope, torch.float64)
    return F.scaled_dot_product_attention(c.q.double(), K, V, enable_gqa=True)


def rel_err(y: torch.Tensor, y_exact: torch.Tensor) -> float:
    return float((y.double() - y_exact).norm() / y_exact.norm())


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cost(wl: Workload, mode: str, elem: int) -> tuple[float, float]:
    """Bytes and FLOPs one decode step must move and do, with ``elem``-byte cache entries.

    ``dense``: K and V; ``QK·`` and ``P·V``. ``absorbed``: latents and bases;
    ``q·W_kᵀ``, scores over the latents, ``P·C_v``, ``·W_v``. ``pre-RoPE``: the same
    bytes (a fused kernel reconstructs key tiles on chip); ``C_k·W_k`` for every key,
    its rotation, scores and the value side as absorbed.
    """
    T, Hq, Hkv, d, rk, rv = wl.T, wl.Hq, wl.Hkv, wl.d, wl.rk, wl.rv
    io = 2 * Hq * d * elem  # q in, out back
    if mode == "dense":
        return 2 * T * Hkv * d * elem + io, 4.0 * Hq * T * d
    bases = (rk + rv) * Hkv * d * elem
    latents = T * (rk + rv) * elem
    values = 2.0 * Hq * T * rv + 2.0 * Hq * rv * d
    if mode == "absorbed":
        return latents + bases + io, 2.0 * Hq * d * rk + 2.0 * Hq * T * rk + values
    return latents + bases + io, 2.0 * T * rk * Hkv * d + 6.0 * T * Hkv * d + 2.0 * Hq * T * d + values


def gpu_roofline_row(wl: Workload, mode: str, method: str) -> Row:
    """``mode``'s bytes and FLOPs at an H100's limits (bf16 cache), against dense bf16 attention."""
    gpu = table_peaks("H100")
    b, f = cost(wl, mode, 2)
    ours = roofline(b, {torch.bfloat16: f}, gpu)
    db, df = cost(wl, "dense", 2)
    dense = roofline(db, {torch.bfloat16: df}, gpu)
    return Row(
        wl.name, method, ours.limit_s * 1e3, kind="roofline",
        note=(f"{ours.bytes / 1e6:.1f} MB, {ours.flops / 1e9:.2f} GFLOP ({ours.bound}-bound) vs dense "
              f"{dense.bytes / 1e6:.1f} MB, {dense.flops / 1e9:.2f} GFLOP at {dense.limit_s * 1e3:.4f} ms: "
              f"{dense.limit_s / ours.limit_s:.2f}x less time at the limit"),
        extra={"bytes": ours.bytes, "flops": ours.flops, "dense_bytes": dense.bytes, "dense_flops": dense.flops,
               "dense_limit_ms": dense.limit_s * 1e3},
    )


def cpu_roofline_row(wl: Workload, mode: str, measured_s: float, peaks: Peaks, what: str) -> Row:
    b, f = cost(wl, mode, 4)
    db, df = cost(wl, "dense", 4)
    dense = roofline(db, {torch.float32: df}, peaks)
    row = roofline_row(wl.name, measured_s, b, {torch.float32: f}, peaks,
                       what=f"{what}; dense: {dense.bytes / 1e6:.0f} MB, {dense.flops / 1e9:.2f} GFLOP, "
                            f"limit {dense.limit_s * 1e3:.3g} ms")
    row.method = f"roofline {mode} (hw limit)"
    row.extra.update(dense_bytes=dense.bytes, dense_flops=dense.flops, dense_limit_ms=dense.limit_s * 1e3)
    return row


def decode_rows(wl: Workload, repeats: int, peaks: Peaks) -> Iterator[Row]:
    """The decode workload's timed rows and its roofline rows."""
    c = make_cache(wl)
    exact_plain, exact_rope = exact(c, wl, None), exact(c, wl, ROPE)
    K, V = dense_kv(c, wl, ROPE, torch.float32)
    dense_bytes = nbytes(K, V)
    cache_bytes = nbytes(c.Ck, c.Cv, c.Wk, c.Wv)
    bf16 = [t.bfloat16() for t in (c.q, c.Ck, c.Cv, c.Wk, c.Wv)]

    def timed(method: str, kind: str, fn: Callable[[], torch.Tensor], want: torch.Tensor, stored: int,
              note: str) -> Row:
        t, y = time_fn(fn, repeats=repeats, device=CPU)
        return Row(wl.name, method, t * 1e3, kind=kind, errors={"rel err": rel_err(y, want)},
                   note=f"cache {stored / 2**20:.1f} MiB ({dense_bytes / stored:.2f}x smaller); {note}",
                   extra={"cache_bytes": stored, "dense_cache_bytes": dense_bytes})

    absorbed = timed("ours absorbed", "ours", lambda: lowrank_attention(c.q, c.Ck, c.Cv, c.Wk, c.Wv),
                     exact_plain, cache_bytes, "rope=None: attention over the latents")
    backend = "C++ kernel" if lowrank_attention_cpp.cpp_supports(c.q) and cpp_available() else "reference backend"
    pre_rope = timed("ours pre-RoPE", "ours",
                     lambda: lowrank_attention(c.q, c.Ck, c.Cv, c.Wk, c.Wv, rope=ROPE),
                     exact_rope, cache_bytes, f"keys reconstructed and rotated ({backend})")
    low = timed("ours absorbed, bf16 cache", "ours", lambda: lowrank_attention(*bf16), exact_plain,
                nbytes(*bf16[1:]), "bf16 latents and bases; error includes their rounding")
    dense = timed("dense SDPA fp32", "peer",
                  lambda: F.scaled_dot_product_attention(c.q, K, V, enable_gqa=True), exact_rope, dense_bytes,
                  "F.scaled_dot_product_attention over the dense fp32 cache")
    dense.note = f"dense cache {dense_bytes / 2**20:.1f} MiB; F.scaled_dot_product_attention(enable_gqa=True)"
    per_token = (wl.rk + wl.rv) / (2 * wl.Hkv * wl.d)
    absorbed.note += f"; per token {1 / per_token:.1f}x smaller"
    yield from (absorbed, pre_rope, low, dense)
    for isa in cpp_isas() if wl.T == 32768 else []:
        for label, rope, want in (("absorbed", None, exact_plain), ("pre-RoPE", ROPE, exact_rope)):
            yield timed(f"ours {label} isa={ISA_NAMES[isa]}", "peer", cpp_call(c, rope, isa), want, cache_bytes,
                        f"C++ kernel forced onto its {ISA_NAMES[isa]} path")
    yield cpu_roofline_row(wl, "absorbed", absorbed.time_ms / 1e3, peaks, "latents + bases from DRAM")
    yield cpu_roofline_row(wl, "pre-RoPE", pre_rope.time_ms / 1e3, peaks,
                           "same bytes; C_k·W_k for every key is the FLOP cost")
    yield gpu_roofline_row(wl, "absorbed", "roofline H100 absorbed (GPU estimate)")
    yield gpu_roofline_row(wl, "pre-RoPE", "roofline H100 pre-RoPE (GPU estimate)")


def ragged_rows(wl: Workload, repeats: int) -> Iterator[Row]:
    """One decode step of 4 sequences of different lengths over a cache of ``wl.T``."""
    B, n = len(RAGGED_FRACTIONS), wl.Hkv * wl.d
    g = torch.Generator().manual_seed(4 * wl.T)
    q = torch.randn(B, wl.Hq, 1, wl.d, generator=g)
    Ck, Cv = torch.randn(B, wl.T, wl.rk, generator=g), torch.randn(B, wl.T, wl.rv, generator=g)
    Wk = torch.randn(wl.rk, n, generator=g) / math.sqrt(wl.rk)
    Wv = torch.randn(wl.rv, n, generator=g) / math.sqrt(wl.rv)
    lengths = [int(f * wl.T) for f in RAGGED_FRACTIONS]
    seqlens = torch.tensor(lengths, dtype=torch.int32)

    def heads(C: torch.Tensor, W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``C·W`` as ``[b, Hkv, t, d]``."""
        return (C.to(dtype) @ W.to(dtype)).view(C.shape[0], C.shape[1], wl.Hkv, wl.d).transpose(1, 2)

    # float64 attention per sequence over its valid prefix (keys without RoPE: the absorbed mode).
    exact = torch.cat([F.scaled_dot_product_attention(q[b:b + 1].double(), heads(Ck[b:b + 1, :L], Wk, torch.float64),
                                                      heads(Cv[b:b + 1, :L], Wv, torch.float64), enable_gqa=True)
                       for b, L in enumerate(lengths)])
    K, V = heads(Ck, Wk, torch.float32).contiguous(), heads(Cv, Wv, torch.float32).contiguous()
    mask = (torch.arange(wl.T) < seqlens.view(B, 1, 1, 1))
    lat = nbytes(Ck, Cv, Wk, Wv)
    note = f"lengths {lengths}"

    def timed(method: str, kind: str, fn: Callable[[], torch.Tensor], extra_note: str) -> Row:
        t, y = time_fn(fn, repeats=repeats, device=CPU)
        return Row(wl.name + f" ragged B={B}", method, t * 1e3, kind=kind, errors={"rel err": rel_err(y, exact)},
                   note=f"{note}; {extra_note}", extra={"cache_bytes": lat, "dense_cache_bytes": nbytes(K, V)})

    yield timed("ours absorbed", "ours", lambda: lowrank_attention(q, Ck, Cv, Wk, Wv, cache_seqlens=seqlens),
                f"cache_seqlens; latents {lat / 2**20:.0f} MiB")
    for isa in cpp_isas():
        yield timed(f"ours absorbed isa={ISA_NAMES[isa]}", "peer",
                    cpp_call(None, None, isa, seqlens, (q, Ck, Cv, Wk, Wv)), "C++ kernel forced onto this path")
    with use_backend("reference"):
        yield timed("ours absorbed, reference backend", "peer",
                    lambda: lowrank_attention(q, Ck, Cv, Wk, Wv, cache_seqlens=seqlens),
                    "plain PyTorch: masks a zero-filled copy of v_latent")
    yield timed("dense SDPA fp32, masked", "peer",
                lambda: F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True),
                f"one call, boolean mask over the padded dense cache ({nbytes(K, V) / 2**20:.0f} MiB)")
    yield timed("dense SDPA fp32, per sequence", "peer",
                lambda: torch.cat([F.scaled_dot_product_attention(q[b:b + 1], K[b:b + 1, :, :L], V[b:b + 1, :, :L],
                                                                  enable_gqa=True) for b, L in enumerate(lengths)]),
                "one call per sequence on its valid prefix")


def minilm_rows(quick: bool) -> Iterator[Row]:
    """The real-activations sweep as rows (no timing)."""
    from svdkernels.kv.evaluate import minilm_activations, rank_sweep

    try:
        acts = minilm_activations(MINILM_TOKENS)
    except ImportError as e:  # the model package is optional for the bench
        yield Row("MiniLM xKV", "skipped", None, note=str(e))
        return
    name = f"MiniLM xKV T={MINILM_TOKENS}"
    for r in rank_sweep(acts, MINILM_RANKS_QUICK if quick else MINILM_RANKS):
        label = "per-layer SVD" if r.group_size == 1 else f"xKV G={r.group_size}"
        yield Row(
            name, f"{label} r={r.rank_per_layer}/layer", None, kind="peer",
            errors={"attn err": r.attn_err, "key err": r.key_err, "key/EY": r.key_err / r.key_opt,
                    "value err": r.value_err},
            note=(f"group rank {r.rank}; {r.floats_per_token} latent floats/token; "
                  f"bases {r.basis_floats / 1e3:.0f}k floats"),
            extra=dataclasses.asdict(r),
        )


LEGEND = (
    "rel err = |out - exact| / |exact|, exact = float64 attention over the same reconstructed keys (RoPE applied "
    "for pre-RoPE and dense) and values; the bf16 row against the float32 latents (includes the cache's rounding).\n"
    "cache = latents + bases (fp32 unless noted) vs the dense fp32 K and V; per token the latents are "
    "(rk + rv) / (2·Hkv·d) of the dense cache; the bases are a per-sequence constant.\n"
    "roofline rows: bytes and FLOPs per decode step, the time at the hardware limit (measured/limit in the note), "
    "and dense attention's at the same limits; H100 rows assume bf16 caches. Targets (issue 5): cache >= 4x smaller; "
    "absorbed at least as fast as dense at 32k (aim 1.5x); issue 19: absorbed >= 1.5x dense SDPA on the "
    "ragged batch, pre-RoPE within 1.3x of its roofline (FLOPs / measured float32 GEMM peak).\n"
    "MiniLM rows: all-MiniLM-L6-v2 keys/values on a 320-token passage; groups of G layers get rank G·r (equal latent "
    "floats per token); attn err = all layers' attention outputs; key/EY = key error / Eckart-Young optimum."
)


@register("lowrank_attention", count=lambda quick: len(workloads(quick)) + 2, legend=LEGEND)
def bench_lowrank_attention(quick: bool, repeats: int) -> Iterator[Row | str]:
    """Decode over the low-rank cache against dense SDPA, then the MiniLM check (CPU)."""
    peaks = device_peaks(CPU, quick)
    for wl in workloads(quick):
        yield wl.name
        yield from decode_rows(wl, repeats, peaks)
    wl = ragged_workload(quick)
    yield f"{wl.name} ragged"
    yield from ragged_rows(wl, repeats)
    yield f"MiniLM xKV T={MINILM_TOKENS}"
    yield from minilm_rows(quick)
