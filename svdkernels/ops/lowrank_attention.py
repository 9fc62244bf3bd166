"""The ``lowrank_attention`` op: attention over a KV cache stored as low-rank latents.

``torch.ops.svdkernels.lowrank_attention``: schema, fake implementation, validation
and backend dispatch; the math is in ``svdkernels/reference/lowrank_attention.py``.
Keys and values are stored as per-token latents times bases (xKV, Chang et al. 2025;
Palu, Chang et al. 2024; ShadowKV's per-sequence bases); keys pre-RoPE, rotated after
reconstruction; values never reconstructed (``out_h = (softmax·C_v)·W_v,h``). Without
RoPE the key basis is absorbed into the query and attention runs over the latents
directly, as in DeepSeek-V2's multi-head latent attention (MLA).

Conventions (shared by every backend):

- ``q [B, Hq, Sq, d]`` carries RoPE already (applied at the queries' own positions,
  as the model computes them); the op rotates keys only, key ``t`` at position ``t``.
- ``cache_seqlens [B]`` (int32/int64) is the valid length ``L_b <= T`` of each
  sequence; latents at ``t >= L_b`` are never read (they may hold anything).
- ``causal``: query ``i`` sees keys ``t <= L_b - Sq + i`` (bottom-right alignment:
  the queries are the last ``Sq`` tokens of the cache). Decode is ``Sq = 1``.
- ``lse [B, Hq, Sq]``: natural-log sum of ``exp(scores)`` in float32 (float64 for
  float64 input); ``-inf`` (with ``out = 0``) for a query that sees no key.
- One floating dtype for ``q``, latents and bases; products accumulate in float32;
  ``out`` has ``q``'s dtype.

Inference only: the op has no autograd formula (a backward through it raises).

Backends: CUDA tensors (fp32/fp16/bf16) run the flash-decoding Triton kernel of
``svdkernels/triton/lowrank_attention.py`` (T split across programs, a fixed-order
combine; prefill folds Sq into the rows); CPU tensors in float32/bfloat16 with up
to 16 query tokens run the C++ decode kernel when ``svdkernels._C`` is built
(``svdkernels/ops/lowrank_attention_cpp.py``: only each sequence's valid prefix is
read); everything else, and float64, runs the reference. Forcing ``triton`` on CPU tensors runs the kernel under the interpreter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch._subclasses.fake_tensor import is_fake

from svdkernels.backends import requested_backend, select_backend, traced_triton
from svdkernels.ops import lowrank_attention_cpp as cpp_backend
from svdkernels.ops.registration import triton_op
from svdkernels.reference import lowrank_attention as reference

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LAYOUTS = {"neox": reference.ROPE_NEOX, "interleaved": reference.ROPE_INTERLEAVED}


@dataclass(frozen=True)
class RoPE:
    """Rotary position embedding applied to the reconstructed keys.

    Key ``t`` is rotated by angles ``(t / scaling) · theta^(-2i / rotary_dim)``,
    ``i < rotary_dim / 2``, computed in float32 as Hugging Face computes them (so
    keys rotate exactly as the model rotates its queries; the rotation itself runs
    in the accumulation dtype).

    Attributes:
        theta: the base (``rope_theta``; 10000 in Llama 2, 500000 in Llama 3).
        scaling: linear position interpolation: positions are divided by this
            factor (Hugging Face ``rope_type="linear"`` with ``factor``; 1 = none).
        layout: ``"neox"`` rotates pairs ``(x_i, x_{i + r/2})`` (Hugging Face Llama's
            ``rotate_half``); ``"interleaved"`` rotates ``(x_{2i}, x_{2i+1})`` (GPT-J,
            Meta's original Llama).
        rotary_dim: how many leading features of each head rotate (even); ``None``
            means all ``d``. The rest pass through (partial rotary, GPT-NeoX).
    """

    theta: float = 10000.0
    scaling: float = 1.0
    layout: str = "neox"
    rotary_dim: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("theta", "scaling"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"rope.{name}: expected a finite number > 0, got {value!r}")
        if self.layout not in _LAYOUTS:
            raise ValueError(f"rope.layout: expected one of {sorted(_LAYOUTS)}, got {self.layout!r}")
        r = self.rotary_dim
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 2 or r % 2):
            raise ValueError(f"rope.rotary_dim: expected None or an even int >= 2, got {r!r}")

    def op_args(self, d: int) -> tuple[bool, float, float, int, int]:
        """The op's primitive arguments ``(rope, theta, scaling, layout code, rotary_dim)``."""
        return True, float(self.theta), float(self.scaling), _LAYOUTS[self.layout], self.rotary_dim or d

    def params(self, d: int) -> tuple[float, float, int, int]:
        """``(theta, scaling, layout code, rotary_dim)`` for the reference's dense attention."""
        return self.op_args(d)[1:]


NO_ROPE = (False, 10000.0, 1.0, reference.ROPE_NEOX, 0)
"""The op's rope arguments when keys carry no RoPE (absorbed attention)."""


# ---------------------------------------------------------------------------
# Validation


def _check_tensor(name: str, t: object, dims: int, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor {what}, got shape {tuple(t.shape)}")
    return t


def _check_like(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if t.dtype != q.dtype:
        raise TypeError(f"{name}: expected dtype {q.dtype} (that of q), got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (that of q), got {t.device}")


def _check_basis(name: str, basis: object, rank: int, rank_from: str, B: int) -> torch.Tensor:
    what = f"[{rank_from[0]}, Hkv*d] or [B, {rank_from[0]}, Hkv*d]"
    if not isinstance(basis, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(basis).__name__}")
    if basis.dim() not in (2, 3):
        raise ValueError(f"{name}: expected a 2-D or 3-D tensor {what}, got shape {tuple(basis.shape)}")
    if basis.dim() == 3 and basis.shape[0] != B:
        raise ValueError(f"{name}: expected a per-sequence basis [B, {rank_from[0]}, Hkv*d] with B = {B} "
                         f"(from q), got shape {tuple(basis.shape)}")
    if basis.shape[-2] != rank:
        raise ValueError(f"{name}: expected {rank_from[0]} = {rank} rows ({rank_from[0]} from {rank_from[1]}), "
                         f"got shape {tuple(basis.shape)}")
    return basis


def validate(
    q: torch.Tensor,
    k_latent: torch.Tensor,
    v_latent: torch.Tensor,
    k_basis: torch.Tensor,
    v_basis: torch.Tensor,
    cache_seqlens: Optional[torch.Tensor],
    sm_scale: float,
    rope: bool,
    rotary_dim: int,
    rope_theta: float = 10000.0,
    rope_scaling: float = 1.0,
    causal: bool = True,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for any bad input
    (shapes, dtypes, devices, scalars; not the values of ``cache_seqlens``: see
    :func:`check_seqlens_values`)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    _check_tensor("q", q, 4, "[B, Hq, Sq, d]")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q: expected dtype float32, bfloat16, float16 or float64, got {q.dtype}")
    B, Hq, Sq, d = q.shape
    if min(Hq, d) < 1:
        raise ValueError(f"q: expected Hq >= 1 and d >= 1 in [B, Hq, Sq, d], got shape {tuple(q.shape)}")
    _check_tensor("k_latent", k_latent, 3, "[B, T, rk]")
    _check_tensor("v_latent", v_latent, 3, "[B, T, rv]")
    for name, t in (("k_latent", k_latent), ("v_latent", v_latent)):
        _check_like(name, t, q)
    if k_latent.shape[0] != B:
        raise ValueError(f"k_latent: expected [B, T, rk] with B = {B} (from q), got shape {tuple(k_latent.shape)}")
    T = k_latent.shape[1]
    if v_latent.shape[:2] != k_latent.shape[:2]:
        raise ValueError(f"v_latent: expected [B, T, rv] with B = {B}, T = {T} (from k_latent), "
                         f"got shape {tuple(v_latent.shape)}")
    rk, rv = k_latent.shape[2], v_latent.shape[2]
    if min(rk, rv) < 1:
        raise ValueError(f"k_latent, v_latent: expected ranks rk, rv >= 1, got rk = {rk}, rv = {rv}")
    _check_basis("k_basis", k_basis, rk, ("rk", "k_latent"), B)
    _check_basis("v_basis", v_basis, rv, ("rv", "v_latent"), B)
    for name, t in (("k_basis", k_basis), ("v_basis", v_basis)):
        _check_like(name, t, q)
    width = k_basis.shape[-1]
    if width == 0 or width % d:
        raise ValueError(f"k_basis: expected last dim Hkv*d, a positive multiple of d = {d} (from q), got {width}")
    if v_basis.shape[-1] != width:
        raise ValueError(f"v_basis: expected last dim Hkv*d = {width} (that of k_basis), got {v_basis.shape[-1]}")
    Hkv = width // d
    if Hq % Hkv:
        raise ValueError(f"q: expected Hq a multiple of Hkv = {Hkv} (k_basis last dim {width} / d {d}), "
                         f"got Hq = {Hq}")
    if cache_seqlens is not None:
        _check_tensor("cache_seqlens", cache_seqlens, 1, "[B]")
        if cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cache_seqlens: expected dtype torch.int32 or torch.int64, got {cache_seqlens.dtype}")
        if cache_seqlens.shape[0] != B:
            raise ValueError(f"cache_seqlens: expected shape [B] = [{B}] (from q), got {tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens: expected device {q.device} (that of q), got {cache_seqlens.device}")
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)) or not (
            math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale: expected a finite number > 0, got {sm_scale!r}")
    if rope and not (2 <= rotary_dim <= d and rotary_dim % 2 == 0):
        raise ValueError(f"rope.rotary_dim: expected an even number in [2, d = {d}], got {rotary_dim}")
    if rope:
        # θ <= 0 or a zero scaling makes the angles NaN or infinite: every score would be NaN.
        for name, v in (("rope_theta", rope_theta), ("rope_scaling", rope_scaling)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")


def check_seqlens_values(cache_seqlens: Optional[torch.Tensor], T: int) -> None:
    """``0 <= cache_seqlens <= T``, or a ``ValueError``. Reads the values (a device
    synchronisation on CUDA), so it runs in the op's real implementation only."""
    if cache_seqlens is None or cache_seqlens.numel() == 0:
        return
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < 0 or hi > T:
        raise ValueError(f"cache_seqlens: expected values in [0, T] = [0, {T}] (T from k_latent), "
                         f"got min {lo}, max {hi}")


# ---------------------------------------------------------------------------
# The op

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What the Triton kernel computes in; float64 runs on the reference unless triton is forced."""


@torch.library.custom_op("svdkernels::_lowrank_attention_dispatch", mutates_args=())
def _lowrank_attention_dispatch_op(
    q: torch.Tensor,
    k_latent: torch.Tensor,
    v_latent: torch.Tensor,
    k_basis: torch.Tensor,
    v_basis: torch.Tensor,
    cache_seqlens: Optional[torch.Tensor],
    causal: bool,
    sm_scale: float,
    rope: bool,
    rope_theta: float,
    rope_scaling: float,
    rope_layout: int,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Opaque to tracing: every backend of ``lowrank_attention``. The cache lengths'
    values are checked here, where the tensors are real."""
    check_seqlens_values(cache_seqlens, k_latent.shape[1])
    args = (q, k_latent, v_latent, k_basis, v_basis, cache_seqlens, causal, sm_scale,
            rope, rope_theta, rope_scaling, rope_layout, rotary_dim)
    backend = select_backend("lowrank_attention", q.device, dtype=q.dtype, triton_dtypes=TRITON_DTYPES,
                             has_cpp=True)
    if backend == "triton":
        from svdkernels.triton import lowrank_attention as kernels  # on first use: never at import

        return kernels.lowrank_attention(*args)
    if backend == "cpp":
        if cpp_backend.cpp_supports(q):
            return cpp_backend.lowrank_attention(*args)
        if requested_backend() == "cpp":
            raise RuntimeError(f"lowrank_attention: the cpp backend takes CPU tensors of dtype float32 or bfloat16 "
                               f"with Sq <= {cpp_backend.CPP_MAX_SQ}, got {q.device.type} {q.dtype}, Sq = {q.shape[2]}")
    return reference.lowrank_attention(*args)


@triton_op("svdkernels::lowrank_attention", mutates_args=())
def lowrank_attention_op(
    q: torch.Tensor,
    k_latent: torch.Tensor,
    v_latent: torch.Tensor,
    k_basis: torch.Tensor,
    v_basis: torch.Tensor,
    cache_seqlens: Optional[torch.Tensor],
    causal: bool,
    sm_scale: float,
    rope: bool,
    rope_theta: float,
    rope_scaling: float,
    rope_layout: int,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.svdkernels.lowrank_attention``: ``(out, lse)``; see :func:`lowrank_attention`.

    ``rope``, ``rope_theta``, ``rope_scaling``, ``rope_layout`` (0 neox, 1 interleaved)
    and ``rotary_dim`` are :class:`RoPE` flattened into the schema's primitive types.
    A ``triton_op``: where the call runs compiled Triton kernels, torch.compile traces
    their launches; every other backend is the opaque ``_lowrank_attention_dispatch``.
    """
    validate(q, k_latent, v_latent, k_basis, v_basis, cache_seqlens, sm_scale, rope, rotary_dim,
             rope_theta, rope_scaling, causal)
    args = (q, k_latent, v_latent, k_basis, v_basis, cache_seqlens, causal, sm_scale,
            rope, rope_theta, rope_scaling, rope_layout, rotary_dim)
    if traced_triton("lowrank_attention", q.device, dtype=q.dtype, triton_dtypes=TRITON_DTYPES, has_cpp=True):
        from svdkernels.triton import lowrank_attention as kernels

        if cache_seqlens is not None and not is_fake(cache_seqlens):
            check_seqlens_values(cache_seqlens, k_latent.shape[1])  # eager: values are real

        return kernels.lowrank_attention(*args)
    return torch.ops.svdkernels._lowrank_attention_dispatch(*args)


@_lowrank_attention_dispatch_op.register_fake
def _(q, k_latent, v_latent, k_basis, v_basis, cache_seqlens, causal, sm_scale,
      rope, rope_theta, rope_scaling, rope_layout, rotary_dim):
    validate(q, k_latent, v_latent, k_basis, v_basis, cache_seqlens, sm_scale, rope, rotary_dim,
             rope_theta, rope_scaling, causal)
    B, Hq, Sq, d = q.shape
    return q.new_empty(B, Hq, Sq, d), q.new_empty(B, Hq, Sq, dtype=reference.accumulate_dtype(q.dtype))


def _rope_args(rope: Optional[RoPE], d: int) -> tuple[bool, float, float, int, int]:
    if rope is None:
        return NO_ROPE
    if not isinstance(rope, RoPE):
        raise TypeError(f"rope: expected None or svdkernels.RoPE, got {type(rope).__name__}")
    return rope.op_args(d)


def lowrank_attention(
    q: torch.Tensor,
    k_latent: torch.Tensor,
    v_latent: torch.Tensor,
    k_basis: torch.Tensor,
    v_basis: torch.Tensor,
    *,
    cache_seqlens: Optional[torch.Tensor] = None,
    rope: Optional[RoPE] = None,
    causal: bool = True,
    sm_scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention of ``q`` over keys ``C_k·W_k`` and values ``C_v·W_v`` kept as latents.

    ``out_h = softmax(sm_scale · q_h · RoPE(C_k·W_k,j)ᵀ) · C_v · W_v,j`` for query head
    ``h`` and its kv head ``j = h // (Hq / Hkv)`` (grouped-query attention). Keys are
    reconstructed pre-RoPE and rotated (xKV, Chang et al. 2025; Palu, Chang et al.
    2024); values never are. With ``rope=None`` the key basis is absorbed into the
    query, ``(q_h·W_k,jᵀ)·C_kᵀ``, and attention runs over the latents directly
    (DeepSeek-V2's MLA): the same result, far less work per cached token.

    Args:
        q: ``[B, Hq, Sq, d]`` queries, RoPE already applied at their positions.
        k_latent: ``[B, T, rk]`` per-token key latents (pre-RoPE keys ``= C_k·W_k``).
        v_latent: ``[B, T, rv]`` per-token value latents.
        k_basis: ``[rk, Hkv*d]`` shared, or ``[B, rk, Hkv*d]`` per sequence (ShadowKV);
            column ``j*d + e`` is feature ``e`` of kv head ``j`` (``k_proj``'s layout).
        v_basis: ``[rv, Hkv*d]`` or ``[B, rv, Hkv*d]``, likewise.
        cache_seqlens: ``[B]`` int32/int64, valid length ``L_b <= T`` per sequence
            (ragged batches); latents past it are never read. ``None``: all ``T``.
        rope: :class:`RoPE` to rotate key ``t`` at position ``t``; ``None`` for keys
            without RoPE (absorbed attention).
        causal: query ``i`` sees keys ``t <= L_b - Sq + i`` (bottom-right aligned).
        sm_scale: score scale, default ``1/sqrt(d)``.
        return_lse: also return the log-sum-exp, to merge with attention over other
            keys (:func:`merge_attention`).

    Returns:
        ``out [B, Hq, Sq, d]`` in ``q``'s dtype; with ``return_lse`` also
        ``lse [B, Hq, Sq]`` (float32; float64 for float64 input), ``-inf`` where a
        query sees no key (its ``out`` is 0). Inference only (no autograd).

    Example::

        q = torch.randn(1, 32, 1, 128)                      # one decode step
        C_k, C_v = torch.randn(1, 4096, 256), torch.randn(1, 4096, 256)
        W_k, W_v = torch.randn(256, 8 * 128), torch.randn(256, 8 * 128)
        out = svdkernels.lowrank_attention(q, C_k, C_v, W_k, W_v, rope=svdkernels.RoPE())
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        _check_tensor("q", q, 4, "[B, Hq, Sq, d]")
    d = q.shape[-1]
    rope_args = _rope_args(rope, d)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    # Validated here too: the dispatcher's own type check would otherwise answer
    # first, without naming what was expected.
    validate(q, k_latent, v_latent, k_basis, v_basis, cache_seqlens, scale, rope_args[0], rope_args[4],
             rope_args[1], rope_args[2], causal)
    out, lse = torch.ops.svdkernels.lowrank_attention(
        q, k_latent, v_latent, k_basis, v_basis, cache_seqlens, causal, float(scale), *rope_args)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------
# Dense tails and merging


def merge_attention(
    out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets, from the two partial results.

    ``out_i [B, Hq, Sq, dv]`` and ``lse_i [B, Hq, Sq]`` as :func:`lowrank_attention`
    returns them (``return_lse=True``). Returns ``(out, lse)``: ``out`` in ``out1``'s
    dtype, the softmax-weighted combination (flash-decoding's combine step).
    """
    for name, t in (("out1", out1), ("out2", out2)):
        _check_tensor(name, t, 4, "[B, Hq, Sq, dv]")
    if out2.shape != out1.shape:
        raise ValueError(f"out2: expected shape {tuple(out1.shape)} (that of out1), got {tuple(out2.shape)}")
    for name, t in (("lse1", lse1), ("lse2", lse2)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(out1.shape[:3]):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected shape [B, Hq, Sq] = {list(out1.shape[:3])}, got {got}")
    return reference.merge_attention(out1, lse1, out2, lse2)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: Optional[RoPE] = None,
    k_start: Union[int, torch.Tensor] = 0,
    causal: bool = True,
    sm_scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a dense block of keys (e.g. the recent, uncompressed tokens),
    returning ``(out, lse)`` to merge with :func:`lowrank_attention`'s.

    ``q [B, Hq, Sq, d]`` (RoPE applied), ``k [B, Hkv, S, d]`` pre-RoPE (with ``rope``,
    key ``s`` is rotated at position ``k_start + s``; ``k_start`` an int or ``[B]``),
    ``v [B, Hkv, S, dv]``. ``causal``: the queries are the block's last ``Sq`` tokens.
    """
    _check_tensor("q", q, 4, "[B, Hq, Sq, d]")
    _check_tensor("k", k, 4, "[B, Hkv, S, d]")
    _check_tensor("v", v, 4, "[B, Hkv, S, dv]")
    for name, t in (("k", k), ("v", v)):
        _check_like(name, t, q)
    B, Hq, Sq, d = q.shape
    if k.shape[0] != B or k.shape[3] != d or k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"k: expected [B, Hkv, S, d] with B = {B}, d = {d} and Hq = {Hq} a multiple of Hkv "
                         f"(from q), got shape {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected [B, Hkv, S, dv] with [B, Hkv, S] = {list(k.shape[:3])} (from k), "
                         f"got shape {tuple(v.shape)}")
    if rope is not None and not isinstance(rope, RoPE):
        raise TypeError(f"rope: expected None or svdkernels.RoPE, got {type(rope).__name__}")
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    return reference.dense_attention(q, k, v, causal=causal, sm_scale=scale,
                                     rope=None if rope is None else rope.params(d), k_start=k_start)


def lowrank_attention_with_tail(
    q: torch.Tensor,
    k_latent: torch.Tensor,
    v_latent: torch.Tensor,
    k_basis: torch.Tensor,
    v_basis: torch.Tensor,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    *,
    cache_seqlens: Optional[torch.Tensor] = None,
    rope: Optional[RoPE] = None,
    sm_scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Causal attention over a low-rank prefix followed by a dense tail of recent tokens.

    The sequence is latents ``t < L_b`` (positions ``0..L_b-1``) then the tail
    ``k_tail, v_tail [B, Hkv, S, d]`` (pre-RoPE keys, positions ``L_b..L_b+S-1``); the
    queries ``q [B, Hq, Sq, d]`` (RoPE applied) are the tail's last ``Sq`` tokens. So
    every query sees the whole prefix (the op with ``causal=False``) and the tail up
    to itself (:func:`dense_attention`); :func:`merge_attention` combines the two.
    Other arguments as in :func:`lowrank_attention`.
    """
    d = q.shape[-1] if isinstance(q, torch.Tensor) else 0
    scale = 1.0 / math.sqrt(d) if sm_scale is None and d else sm_scale
    out1, lse1 = lowrank_attention(q, k_latent, v_latent, k_basis, v_basis, cache_seqlens=cache_seqlens,
                                   rope=rope, causal=False, sm_scale=scale, return_lse=True)
    if isinstance(k_tail, torch.Tensor) and k_tail.dim() == 4:
        Hkv = k_basis.shape[-1] // d
        if k_tail.shape[1] != Hkv or k_tail.shape[2] < q.shape[2]:
            raise ValueError(f"k_tail: expected [B, Hkv, S, d] with Hkv = {Hkv} (from k_basis) and S >= Sq = "
                             f"{q.shape[2]} (the queries are its last tokens), got shape {tuple(k_tail.shape)}")
    start = cache_seqlens if cache_seqlens is not None else k_latent.shape[1]
    out2, lse2 = dense_attention(q, k_tail, v_tail, rope=rope, k_start=start, causal=True, sm_scale=scale)
    out, lse = merge_attention(out1, lse1, out2, lse2)
    return (out, lse) if return_lse else out
