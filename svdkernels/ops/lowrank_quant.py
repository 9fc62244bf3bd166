"""Low-rank + 4-bit matmul ops of SVDQuant (Li et al. 2024):

- ``torch.ops.svdkernels.lowrank_w4a16_linear``: int4 weights, 16-bit activations;
- ``torch.ops.svdkernels.lowrank_quantize_act`` and ``torch.ops.svdkernels.lowrank_w4a4_gemm``:
  the W4A4 pair, activation quantisation fused with the low-rank down projection,
  and the int4 GEMM fused with the up projection;
- ``torch.ops.svdkernels.lowrank_w4a4_linear``: the W4A4 pair in one call (a model's
  layer call; on the CPU one C++ op, bit-identical to the pair).

Schemas, fake (meta) implementations, input validation and backend dispatch. The
math is in ``svdkernels/reference/lowrank_quant.py``; the packed formats in
``svdkernels/formats/int4.py``. Backends (``svdkernels/backends.py``): CUDA tensors
run these ops on the Triton kernels of ``svdkernels/triton/lowrank_quant.py``
(int8 tensor cores, sm_80 and sm_90; on CPU tensors only when forced with
``use_backend("triton")`` under ``TRITON_INTERPRET=1``); on the CPU
``lowrank_w4a16_linear`` runs a C++ kernel (``csrc/cpu/lowrank_quant.cpp``, the
internal op ``torch.ops.svdkernels._cpp_lowrank_w4a16_linear``) when
``svdkernels._C`` is built, and so do the W4A4 pair (``csrc/cpu/lowrank_w4a4.cpp``:
``_cpp_lowrank_quantize_act``, ``_cpp_lowrank_w4a4_gemm``, ``_cpp_lowrank_w4a4_linear``);
without it, the reference.

Every backend accumulates in float32 and is deterministic (no atomics).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from svdkernels.backends import select_backend, traced_triton
from svdkernels.ops.registration import triton_op
from svdkernels.formats.int4 import (
    GROUP_SIZE,
    dequantize_weight,
    check_float,
    check_group_dim,
    check_packed,
    check_tensor,
)
from svdkernels.reference import lowrank_quant as reference

RANK_MULTIPLE = 16
"""The low-rank branch's rank must be a multiple of this (0 allowed)."""


# ---------------------------------------------------------------------------
# Validation


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}: expected shape {what} = {list(expected)}, got {list(t.shape)}")


def _check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype, why: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} ({why}), got {t.dtype}")


def _check_contiguous(name: str, t: torch.Tensor) -> None:
    # The packed layouts and the kernels read these row-major; a silent copy
    # per call would hide a format mistake and cost a pass over the weight.
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous (row-major) tensor, got strides {t.stride()}")


def _check_device(device: torch.device, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the device of x), got {t.device}")


def _check_rank(L_down: torch.Tensor) -> int:
    r = L_down.shape[0]
    if r % RANK_MULTIPLE:
        raise ValueError(
            f"L_down: expected the rank r = L_down.shape[0] to be a multiple of {RANK_MULTIPLE} "
            f"(0 allowed), got r = {r}"
        )
    return r


def _check_weight(
    qweight: object, scales: object, K: int, dtype: torch.dtype, dtype_why: str
) -> int:
    """Check ``qweight [N, K/2]`` uint8 and ``scales [N, K/64]`` of ``dtype``; return ``N``."""
    qweight = check_tensor("qweight", qweight)
    scales = check_tensor("scales", scales)
    check_packed("qweight", qweight)
    if qweight.dim() != 2:
        raise ValueError(f"qweight: expected shape [N, K/2] (2-D), got {list(qweight.shape)}")
    N = qweight.shape[0]
    _check_shape("qweight", qweight, (N, K // 2), f"[N, K/2] with K = {K}")
    _check_dtype("scales", scales, dtype, dtype_why)
    _check_shape("scales", scales, (N, K // GROUP_SIZE), f"[N, K/{GROUP_SIZE}] with N = {N}, K = {K}")
    _check_contiguous("qweight", qweight)
    _check_contiguous("scales", scales)
    return N


def _check_L(name: str, t: object, expected: tuple[int, ...], what: str, dtype: torch.dtype, why: str) -> torch.Tensor:
    t = check_tensor(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected shape {what} (2-D), got {list(t.shape)}")
    _check_dtype(name, t, dtype, why)
    _check_shape(name, t, expected, what)
    _check_contiguous(name, t)
    return t


def _check_bias(bias: object, N: int, dtype: torch.dtype, why: str) -> None:
    if bias is None:
        return
    bias = check_tensor("bias", bias)
    _check_dtype("bias", bias, dtype, why)
    _check_shape("bias", bias, (N,), "[N]")
    _check_contiguous("bias", bias)


def _check_x(x: object) -> int:
    x = check_tensor("x", x)
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected shape [..., K], got {list(x.shape)}")
    K = x.shape[-1]
    check_group_dim("x", K)
    return K


def validate_w4a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    L_down: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for any bad input."""
    K = _check_x(x)
    why = "the dtype of x"
    N = _check_weight(qweight, scales, K, x.dtype, why)
    L_down = check_tensor("L_down", L_down)
    if L_down.dim() != 2:
        raise ValueError(f"L_down: expected shape [r, K] (2-D), got {list(L_down.shape)}")
    r = _check_rank(L_down)
    _check_L("L_down", L_down, (r, K), f"[r, K] with K = {K}", x.dtype, why)
    _check_L("L_up", L_up, (N, r), f"[N, r] with N = {N}, r = {r}", x.dtype, why)
    _check_bias(bias, N, x.dtype, why)
    _check_device(x.device, qweight=qweight, scales=scales, L_down=L_down, L_up=L_up, bias=bias)


def validate_quantize_act(x: torch.Tensor, smooth: torch.Tensor, L_down: torch.Tensor) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for any bad input."""
    K = _check_x(x)
    smooth = check_tensor("smooth", smooth)
    check_float("smooth", smooth)
    _check_shape("smooth", smooth, (K,), "[K]")
    L_down = check_tensor("L_down", L_down)
    if L_down.dim() != 2:
        raise ValueError(f"L_down: expected shape [r, K] (2-D), got {list(L_down.shape)}")
    r = _check_rank(L_down)
    _check_L("L_down", L_down, (r, K), f"[r, K] with K = {K}", x.dtype, "the dtype of x")
    _check_device(x.device, smooth=smooth, L_down=L_down)


def check_smooth_values(smooth: torch.Tensor) -> None:
    """Every smoothing factor finite and > 0, or a ``ValueError`` naming ``smooth``: a
    zero gives an infinite activation scale, a negative one flips the activations'
    sign against the weights'. Reads the values (a device synchronisation on CUDA),
    so it runs where the tensors are real, never while tracing."""
    if is_fake(smooth) or smooth.numel() == 0:
        return
    lo, hi = torch.aminmax(smooth)
    if bool(lo > 0) and bool(hi < float("inf")):  # a NaN fails both comparisons
        return
    bad = ~(torch.isfinite(smooth) & (smooth > 0))  # the slow path only names the culprit
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"smooth: expected finite factors > 0, got {float(smooth[i])} at index {i} "
                         f"({int(bad.sum())} of {smooth.numel()} bad)")


def validate_w4a4(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    lowrank_act: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for any bad input."""
    xq = check_tensor("xq", xq)
    check_packed("xq", xq)
    if xq.dim() < 1:
        raise ValueError(f"xq: expected shape [..., K/2], got {list(xq.shape)}")
    lead, K = tuple(xq.shape[:-1]), 2 * xq.shape[-1]
    check_group_dim("xq (K = 2 * xq.shape[-1])", K)
    xscale = check_tensor("xscale", xscale)
    _check_dtype("xscale", xscale, torch.float32, "activation scales are float32")
    _check_shape("xscale", xscale, (*lead, K // GROUP_SIZE), f"[..., K/{GROUP_SIZE}] with K = {K}")
    scales = check_tensor("scales", scales)
    check_float("scales", scales)
    dtype = scales.dtype
    why = "the dtype of scales, the layer's activation dtype"
    N = _check_weight(qweight, scales, K, dtype, why)
    lowrank_act = check_tensor("lowrank_act", lowrank_act)
    _check_dtype("lowrank_act", lowrank_act, torch.float32, "the down projection is kept in float32")
    if lowrank_act.dim() != len(lead) + 1 or tuple(lowrank_act.shape[:-1]) != lead:
        raise ValueError(
            f"lowrank_act: expected shape [..., r] with leading dims {list(lead)} (those of xq), "
            f"got {list(lowrank_act.shape)}"
        )
    r = lowrank_act.shape[-1]
    if r % RANK_MULTIPLE:
        raise ValueError(
            f"lowrank_act: expected the rank r = lowrank_act.shape[-1] to be a multiple of "
            f"{RANK_MULTIPLE} (0 allowed), got r = {r}"
        )
    _check_L("L_up", L_up, (N, r), f"[N, r] with N = {N}, r = {r}", dtype, why)
    _check_bias(bias, N, dtype, why)
    _check_device(
        xq.device, xscale=xscale, qweight=qweight, scales=scales, lowrank_act=lowrank_act, L_up=L_up, bias=bias
    )


def _triton() -> ModuleType:
    """``svdkernels.triton.lowrank_quant``, imported on first use (importing svdkernels
    never imports triton)."""
    from svdkernels.triton import lowrank_quant

    return lowrank_quant


# ---------------------------------------------------------------------------
# lowrank_w4a16_linear


@torch.library.custom_op("svdkernels::_lowrank_w4a16_linear_dispatch", mutates_args=())
def _w4a16_dispatch_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    L_down: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """Opaque to tracing: every backend of ``lowrank_w4a16_linear`` (inputs validated)."""
    return _dispatch_w4a16(x, qweight, scales, L_down, L_up, bias)


@triton_op("svdkernels::lowrank_w4a16_linear", mutates_args=())
def lowrank_w4a16_linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    L_down: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``torch.ops.svdkernels.lowrank_w4a16_linear``; see :func:`lowrank_w4a16_linear`.

    A ``triton_op``: where the call runs compiled Triton kernels, torch.compile traces
    their launches (Inductor sees the kernels); every other backend is the opaque
    ``_lowrank_w4a16_linear_dispatch``. The body doubles as the fake kernel."""
    validate_w4a16(x, qweight, scales, L_down, L_up, bias)
    if traced_triton("lowrank_w4a16_linear", x.device, has_cpp=True):
        return _triton().lowrank_w4a16_linear(x, qweight, scales, L_down, L_up, bias)
    return torch.ops.svdkernels._lowrank_w4a16_linear_dispatch(x, qweight, scales, L_down, L_up, bias)


def _dispatch_w4a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    L_down: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """Choose the backend of ``lowrank_w4a16_linear`` and run it (inputs validated):
    the op's body, and the eager fast path of :func:`lowrank_w4a16_linear`."""
    backend = select_backend("lowrank_w4a16_linear", x.device, has_cpp=True)
    if backend == "cpp":
        if x.dim() == 2:
            return _cpp_op("_cpp_lowrank_w4a16_linear")(x, qweight, scales, L_down, L_up, bias, -1)
        x2 = x.reshape(-1, x.shape[-1])  # a view for any x with a row-major last dim
        y = _cpp_op("_cpp_lowrank_w4a16_linear")(x2, qweight, scales, L_down, L_up, bias, -1)
        return y.reshape(*x.shape[:-1], qweight.shape[0])
    if backend == "triton":
        return _triton().lowrank_w4a16_linear(x, qweight, scales, L_down, L_up, bias)
    return reference.lowrank_w4a16_linear(x, qweight, scales, L_down, L_up, bias)


@_w4a16_dispatch_op.register_fake
def _(x, qweight, scales, L_down, L_up, bias):
    validate_w4a16(x, qweight, scales, L_down, L_up, bias)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _w4a16_setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, L_down, L_up, bias = inputs
    ctx.save_for_backward(x, qweight, scales, L_down, L_up)


def _w4a16_backward(ctx, grad: torch.Tensor):
    """Gradients of ``y = x·Wᵀ + (x·L_downᵀ)·L_upᵀ + b`` for ``x``, ``L_down``, ``L_up``
    and ``b`` (QLoRA-style training on a 4-bit base); the int4 weight is frozen.
    ``∂x = g·W + (g·L_up)·L_down`` dequantises ``W`` once, in the dtype of ``x``."""
    x, qweight, scales, L_down, L_up = ctx.saved_tensors
    need_x, _, _, need_down, need_up, need_bias = ctx.needs_input_grad
    g = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    gu = g @ L_up if (need_x or need_down) else None  # [M, r]
    dx = d_down = d_up = d_bias = None
    if need_x:
        W = dequantize_weight(qweight, scales, dtype=x.dtype)
        dx = torch.addmm(g @ W, gu, L_down).reshape(x.shape)
    if need_down:
        d_down = gu.T @ x2
    if need_up:
        d_up = g.T @ (x2 @ L_down.T)
    if need_bias:
        d_bias = g.sum(0)
    return dx, None, None, d_down, d_up, d_bias


lowrank_w4a16_linear_op.register_autograd(_w4a16_backward, setup_context=_w4a16_setup_context)


def lowrank_w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    *,
    L_down: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SVDQuant W4A16 linear layer: ``y = x·deq(qweight)ᵀ + (x·L_downᵀ)·L_upᵀ + bias``.

    The int4 residual and the 16-bit low-rank branch of SVDQuant (Li et al. 2024)
    in one call; float32 accumulation, deterministic. On the CPU it runs the C++
    kernel when ``svdkernels._C`` is built (tuned for 1 to 16 tokens: the packed
    weight is streamed once and unpacked in registers).

    Args:
        x: ``[..., K]`` activations, float32, float16 or bfloat16 (any strides).
        qweight: ``[N, K/2]`` uint8, packed int4 weight (:func:`svdkernels.quant.quantize_weight`).
        scales: ``[N, K/64]`` per-group weight scales, dtype of ``x``.
        L_down: ``[r, K]`` low-rank down projection (``r`` a multiple of 16,
            ``0`` for none), dtype of ``x``; with smoothing it holds ``1/λ``.
        L_up: ``[N, r]`` low-rank up projection, dtype of ``x``.
        bias: ``[N]``, dtype of ``x``, or ``None``.
        ``qweight``, ``scales``, ``L_down``, ``L_up`` and ``bias`` must be contiguous.

    Returns:
        ``y [..., N]`` in the dtype of ``x``.

    Example::

        qweight, scales = svdkernels.quant.quantize_weight(W - L_up @ L_down)
        y = svdkernels.quant.lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up, bias=b)
    """
    validate_w4a16(x, qweight, scales, L_down, L_up, bias)
    if not torch.compiler.is_compiling() and not _needs_grad(x, L_down, L_up, bias):
        # Eager inference fast path: the op's own dispatch function, without the
        # custom-op layer, whose Python overhead is as long as the C++ kernel on a
        # small decoding layer (measured in bench family lowrank_quant: "op call"
        # row). torch.compile, torch.ops and autograd users go through the op.
        return _dispatch_w4a16(x, qweight, scales, L_down, L_up, bias)
    return torch.ops.svdkernels.lowrank_w4a16_linear(x, qweight, scales, L_down, L_up, bias)


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------
# lowrank_quantize_act


@torch.library.custom_op("svdkernels::_lowrank_quantize_act_dispatch", mutates_args=())
def _quantize_act_dispatch_op(
    x: torch.Tensor, smooth: torch.Tensor, L_down: torch.Tensor, unsigned: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Opaque to tracing: every backend of ``lowrank_quantize_act`` (inputs validated)."""
    return _dispatch_quantize_act(x, smooth, L_down, unsigned)


def _dispatch_quantize_act(
    x: torch.Tensor, smooth: torch.Tensor, L_down: torch.Tensor, unsigned: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose the backend of ``lowrank_quantize_act`` and run it (inputs validated)."""
    backend = select_backend("lowrank_quantize_act", x.device, has_cpp=True)
    if backend == "cpp":
        # The C++ op checks the smoothing factors itself (no reduction and host
        # syncs here: they cost as much as quantising a small layer's activations).
        if x.dim() == 2:
            return _cpp_op("_cpp_lowrank_quantize_act")(x, smooth, L_down, unsigned, -1)
        K = x.shape[-1]
        xq, xscale, act = _cpp_op("_cpp_lowrank_quantize_act")(x.reshape(-1, K), smooth, L_down, unsigned, -1)
        lead = x.shape[:-1]
        return xq.reshape(*lead, K // 2), xscale.reshape(*lead, K // GROUP_SIZE), act.reshape(*lead, act.shape[-1])
    check_smooth_values(smooth)
    if backend == "triton":
        return _triton().lowrank_quantize_act(x, smooth, L_down, unsigned)
    return reference.lowrank_quantize_act(x, smooth, L_down, unsigned)


@triton_op("svdkernels::lowrank_quantize_act", mutates_args=())
def lowrank_quantize_act_op(
    x: torch.Tensor, smooth: torch.Tensor, L_down: torch.Tensor, unsigned: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.svdkernels.lowrank_quantize_act``; see :func:`lowrank_quantize_act`
    (a ``triton_op`` like ``lowrank_w4a16_linear``)."""
    validate_quantize_act(x, smooth, L_down)
    if traced_triton("lowrank_quantize_act", x.device, has_cpp=True):
        check_smooth_values(smooth)
        return _triton().lowrank_quantize_act(x, smooth, L_down, unsigned)
    return torch.ops.svdkernels._lowrank_quantize_act_dispatch(x, smooth, L_down, unsigned)


@_quantize_act_dispatch_op.register_fake
def _(x, smooth, L_down, unsigned):
    validate_quantize_act(x, smooth, L_down)
    *lead, K = x.shape
    return (
        x.new_empty(*lead, K // 2, dtype=torch.uint8),
        x.new_empty(*lead, K // GROUP_SIZE, dtype=torch.float32),
        x.new_empty(*lead, L_down.shape[0], dtype=torch.float32),
    )


def lowrank_quantize_act(
    x: torch.Tensor, smooth: torch.Tensor, L_down: torch.Tensor, *, unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVDQuant W4A4, first half: quantise ``x/λ`` and compute the down projection.

    Args:
        x: ``[..., K]`` activations, float32, float16 or bfloat16.
        smooth: ``[K]`` smoothing factors ``λ`` (positive), any float dtype.
        L_down: ``[r, K]`` low-rank down projection (``r`` a multiple of 16, ``0``
            for none), dtype of ``x``, contiguous. It reads the *unsmoothed* ``x``:
            SVDQuant folds ``1/λ`` into it.
        unsigned: quantise ``(x + 0.171875)/λ`` to unsigned int4 (inputs
            ``>= -0.171875``, e.g. after a GELU); the GEMM's bias must then be
            :func:`svdkernels.quant.compensate_unsigned_bias`.

    Returns:
        ``xq [..., K/2]`` uint8 and ``xscale [..., K/64]`` float32: per token and group
        of 64, scale ``absmax/7`` (``max/15`` unsigned), layout in
        ``svdkernels/formats/int4.py``; and ``lowrank_act [..., r] = x·L_downᵀ`` in
        float32.
    """
    validate_quantize_act(x, smooth, L_down)
    if not isinstance(unsigned, bool):
        raise TypeError(f"unsigned: expected a bool, got {type(unsigned).__name__}")
    if not torch.compiler.is_compiling():
        # Eager fast path without the custom-op layer (as lowrank_w4a16_linear's; the
        # W4A4 ops have no autograd).
        return _dispatch_quantize_act(x, smooth, L_down, unsigned)
    return torch.ops.svdkernels.lowrank_quantize_act(x, smooth, L_down, unsigned)


# ---------------------------------------------------------------------------
# lowrank_w4a4_gemm


@torch.library.custom_op("svdkernels::_lowrank_w4a4_gemm_dispatch", mutates_args=())
def _w4a4_dispatch_op(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    lowrank_act: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
    unsigned: bool,
) -> torch.Tensor:
    """Opaque to tracing: every backend of ``lowrank_w4a4_gemm`` (inputs validated)."""
    return _dispatch_w4a4(xq, xscale, qweight, scales, lowrank_act, L_up, bias, unsigned)


def _dispatch_w4a4(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    lowrank_act: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
    unsigned: bool,
) -> torch.Tensor:
    """Choose the backend of ``lowrank_w4a4_gemm`` and run it (inputs validated)."""
    backend = select_backend("lowrank_w4a4_gemm", xq.device, has_cpp=True)
    if backend == "cpp":
        if xq.dim() == 2:
            return _cpp_op("_cpp_lowrank_w4a4_gemm")(xq, xscale, qweight, scales, lowrank_act, L_up, bias, unsigned, -1)
        lead = xq.shape[:-1]
        M = lead.numel()  # not reshape(-1, r): r may be 0
        y = _cpp_op("_cpp_lowrank_w4a4_gemm")(
            xq.reshape(M, xq.shape[-1]), xscale.reshape(M, xscale.shape[-1]), qweight, scales,
            lowrank_act.reshape(M, lowrank_act.shape[-1]), L_up, bias, unsigned, -1)
        return y.reshape(*lead, qweight.shape[0])
    if backend == "triton":
        return _triton().lowrank_w4a4_gemm(xq, xscale, qweight, scales, lowrank_act, L_up, bias, unsigned)
    return reference.lowrank_w4a4_gemm(xq, xscale, qweight, scales, lowrank_act, L_up, bias, unsigned)


@functools.cache
def _cpp_op(name: str) -> Callable[..., torch.Tensor]:
    """``torch.ops.svdkernels.<name>.default`` (the C++ ops exist once svdkernels._C is imported)."""
    return getattr(torch.ops.svdkernels, name).default


@triton_op("svdkernels::lowrank_w4a4_gemm", mutates_args=())
def lowrank_w4a4_gemm_op(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    lowrank_act: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
    unsigned: bool,
) -> torch.Tensor:
    """``torch.ops.svdkernels.lowrank_w4a4_gemm``; see :func:`lowrank_w4a4_gemm`
    (a ``triton_op`` like ``lowrank_w4a16_linear``)."""
    validate_w4a4(xq, xscale, qweight, scales, lowrank_act, L_up, bias)
    if traced_triton("lowrank_w4a4_gemm", xq.device, has_cpp=True):
        return _triton().lowrank_w4a4_gemm(xq, xscale, qweight, scales, lowrank_act, L_up, bias, unsigned)
    return torch.ops.svdkernels._lowrank_w4a4_gemm_dispatch(
        xq, xscale, qweight, scales, lowrank_act, L_up, bias, unsigned)


@_w4a4_dispatch_op.register_fake
def _(xq, xscale, qweight, scales, lowrank_act, L_up, bias, unsigned):
    validate_w4a4(xq, xscale, qweight, scales, lowrank_act, L_up, bias)
    return scales.new_empty(*xq.shape[:-1], qweight.shape[0])


def lowrank_w4a4_gemm(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    *,
    lowrank_act: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    unsigned: bool = False,
) -> torch.Tensor:
    """SVDQuant W4A4, second half: ``y = deq(xq)·deq(qweight)ᵀ + lowrank_act·L_upᵀ + bias``.

    Per group of 64 the int4 products are summed exactly as integers, then rescaled
    by ``xscale·scales`` in float32; the up projection and bias are added in the
    epilogue. With ``unsigned=True``, ``deq(xq) = q·xscale`` includes the shift
    (see :func:`lowrank_quantize_act`), so ``bias`` must be the compensated one.

    Args:
        xq, xscale: ``[..., K/2]`` uint8 and ``[..., K/64]`` float32, from
            :func:`lowrank_quantize_act`.
        qweight, scales: ``[N, K/2]`` uint8 and ``[N, K/64]`` (the layer's activation
            dtype), from :func:`svdkernels.quant.quantize_weight`; contiguous.
        lowrank_act: ``[..., r]`` float32, from :func:`lowrank_quantize_act`.
        L_up: ``[N, r]``, dtype of ``scales``, contiguous.
        bias: ``[N]``, dtype of ``scales``, or ``None``.
        unsigned: ``xq`` holds unsigned nibbles (``lowrank_quantize_act(..., unsigned=True)``).

    Returns:
        ``y [..., N]`` in the dtype of ``scales``.

    Example::

        xq, xs, la = svdkernels.quant.lowrank_quantize_act(x, smooth, L_down)
        y = svdkernels.quant.lowrank_w4a4_gemm(xq, xs, qweight, scales, lowrank_act=la, L_up=L_up, bias=b)
    """
    validate_w4a4(xq, xscale, qweight, scales, lowrank_act, L_up, bias)
    if not isinstance(unsigned, bool):
        raise TypeError(f"unsigned: expected a bool, got {type(unsigned).__name__}")
    if not torch.compiler.is_compiling():
        return _dispatch_w4a4(xq, xscale, qweight, scales, lowrank_act, L_up, bias, unsigned)
    return torch.ops.svdkernels.lowrank_w4a4_gemm(xq, xscale, qweight, scales, lowrank_act, L_up, bias, unsigned)


# ---------------------------------------------------------------------------
# lowrank_w4a4_linear: the pair in one call


def validate_w4a4_linear(
    x: torch.Tensor,
    smooth: torch.Tensor,
    L_down: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for any bad input: the
    checks of :func:`lowrank_quantize_act`, then those of :func:`lowrank_w4a4_gemm`'s
    weight operands, whose dtype is that of ``x``."""
    validate_quantize_act(x, smooth, L_down)
    K, r = x.shape[-1], L_down.shape[0]
    why = "the dtype of x"
    N = _check_weight(qweight, scales, K, x.dtype, why)
    _check_L("L_up", L_up, (N, r), f"[N, r] with N = {N}, r = {r}", x.dtype, why)
    _check_bias(bias, N, x.dtype, why)
    _check_device(x.device, qweight=qweight, scales=scales, L_up=L_up, bias=bias)


@torch.library.custom_op("svdkernels::_lowrank_w4a4_linear_dispatch", mutates_args=())
def _w4a4_linear_dispatch_op(
    x: torch.Tensor,
    smooth: torch.Tensor,
    L_down: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
    unsigned: bool,
) -> torch.Tensor:
    """Opaque to tracing: every backend of ``lowrank_w4a4_linear`` (inputs validated)."""
    return _dispatch_w4a4_linear(x, smooth, L_down, qweight, scales, L_up, bias, unsigned)


def _cpp_w4a4_linear(
    x: torch.Tensor,
    smooth: torch.Tensor,
    L_down: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
    unsigned: bool,
) -> torch.Tensor:
    """The C++ op on ``x [..., K]`` (it checks everything it reads)."""
    return _cpp_op("_cpp_lowrank_w4a4_linear")(x, smooth, L_down, qweight, scales, L_up, bias, unsigned, -1)


def _dispatch_w4a4_linear(
    x: torch.Tensor,
    smooth: torch.Tensor,
    L_down: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
    unsigned: bool,
) -> torch.Tensor:
    """Choose the backend of ``lowrank_w4a4_linear`` and run it (inputs validated):
    the C++ fused op, or the composition of the pair on the other backends."""
    backend = select_backend("lowrank_w4a4_linear", x.device, has_cpp=True)
    if backend == "cpp":
        return _cpp_w4a4_linear(x, smooth, L_down, qweight, scales, L_up, bias, unsigned)
    check_smooth_values(smooth)
    if backend == "triton":
        xq, xscale, act = _triton().lowrank_quantize_act(x, smooth, L_down, unsigned)
        return _triton().lowrank_w4a4_gemm(xq, xscale, qweight, scales, act, L_up, bias, unsigned)
    return reference.lowrank_w4a4_linear(x, smooth, L_down, qweight, scales, L_up, bias, unsigned)


@triton_op("svdkernels::lowrank_w4a4_linear", mutates_args=())
def lowrank_w4a4_linear_op(
    x: torch.Tensor,
    smooth: torch.Tensor,
    L_down: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
    unsigned: bool,
) -> torch.Tensor:
    """``torch.ops.svdkernels.lowrank_w4a4_linear``; see :func:`lowrank_w4a4_linear`
    (a ``triton_op`` like ``lowrank_w4a16_linear``: compiled Triton kernels are
    traced as the pair's two launches)."""
    validate_w4a4_linear(x, smooth, L_down, qweight, scales, L_up, bias)
    if traced_triton("lowrank_w4a4_linear", x.device, has_cpp=True):
        check_smooth_values(smooth)
        xq, xscale, act = _triton().lowrank_quantize_act(x, smooth, L_down, unsigned)
        return _triton().lowrank_w4a4_gemm(xq, xscale, qweight, scales, act, L_up, bias, unsigned)
    return torch.ops.svdkernels._lowrank_w4a4_linear_dispatch(x, smooth, L_down, qweight, scales, L_up, bias, unsigned)


@_w4a4_linear_dispatch_op.register_fake
def _(x, smooth, L_down, qweight, scales, L_up, bias, unsigned):
    validate_w4a4_linear(x, smooth, L_down, qweight, scales, L_up, bias)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def lowrank_w4a4_linear(
    x: torch.Tensor,
    smooth: torch.Tensor,
    L_down: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    unsigned: bool = False,
) -> torch.Tensor:
    """SVDQuant W4A4 linear layer (Li et al. 2024) in one call: :func:`lowrank_quantize_act`
    then :func:`lowrank_w4a4_gemm`, with the same result bit for bit on every backend.

    On the CPU with ``svdkernels._C`` built it is one C++ op (the activations are
    quantised straight into the GEMM's operand layout, no intermediate tensors), and
    its eager call skips the Python validation unless the C++ op rejects the input
    (then the Python checks raise their usual message).

    Args:
        x: ``[..., K]`` activations, float32, float16 or bfloat16.
        smooth: ``[K]`` smoothing factors ``λ`` (finite, > 0), any float dtype.
        L_down: ``[r, K]`` low-rank down projection (``r`` a multiple of 16, ``0`` for
            none), dtype of ``x``, contiguous; reads the unsmoothed ``x``.
        qweight, scales: ``[N, K/2]`` uint8 and ``[N, K/64]`` (dtype of ``x``), from
            :func:`svdkernels.quant.quantize_weight`; contiguous.
        L_up: ``[N, r]``, dtype of ``x``, contiguous.
        bias: ``[N]``, dtype of ``x``, or ``None`` (compensated with
            :func:`svdkernels.quant.compensate_unsigned_bias` when ``unsigned``).
        unsigned: quantise ``(x + 0.171875)/λ`` to unsigned int4 (after a GELU).

    Returns:
        ``y [..., N]`` in the dtype of ``x``.

    Example::

        y = svdkernels.quant.lowrank_w4a4_linear(x, smooth, L_down, qweight, scales, L_up, bias)
    """
    if type(unsigned) is not bool:
        raise TypeError(f"unsigned: expected a bool, got {type(unsigned).__name__}")
    if torch.compiler.is_compiling():
        return torch.ops.svdkernels.lowrank_w4a4_linear(x, smooth, L_down, qweight, scales, L_up, bias, unsigned)
    # Eager fast path, as little Python as possible (a model's forward pays it per
    # layer, with its code out of cache: on MiniLM's evaluation this function cost
    # ~20 us a call more than the bare C++ op, warm 7 us). The C++ op checks every
    # argument it reads; the Python validation only runs to name a rejected
    # argument in the pair's own words.
    try:
        if select_backend("lowrank_w4a4_linear", x.device, has_cpp=True) == "cpp":
            return _cpp_op("_cpp_lowrank_w4a4_linear")(x, smooth, L_down, qweight, scales, L_up, bias, unsigned, -1)
    except (AttributeError, RuntimeError, TypeError, ValueError, IndexError):
        validate_w4a4_linear(x, smooth, L_down, qweight, scales, L_up, bias)
        raise
    validate_w4a4_linear(x, smooth, L_down, qweight, scales, L_up, bias)
    return _dispatch_w4a4_linear(x, smooth, L_down, qweight, scales, L_up, bias, unsigned)
