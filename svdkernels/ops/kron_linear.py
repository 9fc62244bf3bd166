"""The ``kron_linear`` op: ``x @ (Σ_i A_i ⊗ B_i)ᵀ`` without the Kronecker product.

``torch.ops.svdkernels.kron_linear`` (forward) and ``kron_linear_backward``: schema,
fake implementations, autograd, validation and backend dispatch. The math is in
``svdkernels/reference/kron_linear.py``; the fused kernel in
``svdkernels/triton/kron_linear.py`` (CUDA) and the C++ kernels of
``csrc/cpu/kron_linear.cpp`` (float32 CPU tensors, when ``svdkernels._C`` is built;
the backward is one fused pass giving ``∂x``, ``∂A`` and ``∂B``).

A factor travels through the schema as a list: ``[dense]`` with ``dense [r, p, q]``,
or ``[u [r, p, k], v [r, k, q]]`` for the low-rank form ``u @ v`` (peft LoKr's
``w1_a·w1_b`` / ``w2_a·w2_b``).

:func:`linear_kron` is a linear layer plus its Kronecker delta, one autograd node on
the C++ kernels (the delta added into the layer's output and gradient in place).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch

from svdkernels.backends import requested_backend, select_backend, traced_triton
from svdkernels.ops import kron_linear_cpp as cpp_backend
from svdkernels.ops.registration import triton_op
from svdkernels.reference import kron_linear as reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

FactorLike = Union[torch.Tensor, Sequence[torch.Tensor]]


def factor_dims(name: str, factor: Sequence[torch.Tensor]) -> tuple[int, int, int]:
    """``(r, p, q)`` of a normalised factor list, or a ``ValueError`` naming it."""
    if len(factor) not in (1, 2):
        raise ValueError(f"{name}: expected a tensor [r, p, q] or a pair (u [r, p, k], v [r, k, q]), "
                         f"got a sequence of {len(factor)} tensors")
    for t in factor:
        if t.dim() != 3:
            raise ValueError(f"{name}: expected 3-D factor tensors after adding r, got shape {tuple(t.shape)}")
    if len(factor) == 2:
        u, v = factor
        if u.shape[0] != v.shape[0] or u.shape[2] != v.shape[1]:
            raise ValueError(f"{name}: low-rank pair u [r, p, k], v [r, k, q] do not chain: "
                             f"u {tuple(u.shape)}, v {tuple(v.shape)}")
    return reference.factor_dims(factor)


def validate(x: torch.Tensor, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scale: float) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for any bad input."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x: expected a floating dtype (float32, float16, bfloat16, float64), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x: expected shape [..., a2*b2], got a 0-d tensor")
    for name, factor in (("A", A), ("B", B)):
        for t in factor:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected tensors, got {type(t).__name__}")
            if t.dtype != x.dtype:
                raise TypeError(f"{name}: expected dtype {x.dtype} (that of x), got {t.dtype}")
            if t.device != x.device:
                raise ValueError(f"{name}: expected device {x.device} (that of x), got {t.device}")
    rA, a1, a2 = factor_dims("A", A)
    rB, b1, b2 = factor_dims("B", B)
    if rA != rB:
        raise ValueError(f"A, B: expected the same number r of Kronecker terms, got r = {rA} for A and {rB} for B")
    if rA < 1:
        raise ValueError(f"A: expected at least one Kronecker term, got r = {rA}")
    for name, dims in (("A", (a1, a2)), ("B", (b1, b2))):
        if min(dims) < 1:
            raise ValueError(f"{name}: expected factor dims [r, p, q] with p, q >= 1, got p, q = {dims}")
    if x.shape[-1] != a2 * b2:
        raise ValueError(f"x: expected last dim a2*b2 = {a2}*{b2} = {a2 * b2} (A [r, a1, a2], B [r, b1, b2]), "
                         f"got {x.shape[-1]}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _triton_forward(x2: torch.Tensor, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    from svdkernels.triton import kron_linear as triton_kron  # on first use: never at import

    return triton_kron.kron_linear(x2, reference.compose(A), reference.compose(B), scale)


def _triton_backward(
    g2: torch.Tensor, x2: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor], scale: float,
    needs_x: bool, needs_A: bool, needs_B: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor] | None, list[torch.Tensor] | None]:
    from svdkernels.triton import kron_linear as triton_kron

    gx = gA = gB = None
    if needs_x:
        gx = triton_kron.kron_linear(g2, reference.compose(reference.transpose(A)),
                                     reference.compose(reference.transpose(B)), scale)
    if needs_A or needs_B:
        dA, dB = triton_kron.kron_linear_factor_grads(x2, g2, reference.compose(A), reference.compose(B), scale)
        gA = reference.chain(A, dA) if needs_A else None
        gB = reference.chain(B, dB) if needs_B else None
    return gx, gA, gB


def _backend(x: torch.Tensor) -> str:
    """``select_backend``'s choice, with ``cpp`` only for the calls the C++ kernels take
    (float32 CPU tensors; other calls run the reference unless cpp is forced)."""
    backend = select_backend("kron_linear", x.device, has_cpp=True)
    if backend == "cpp" and not cpp_backend.cpp_supports(x):
        if requested_backend() == "cpp":
            raise RuntimeError(f"kron_linear: the cpp backend takes float32 CPU tensors, got {x.device.type} {x.dtype}")
        return "reference"
    return backend


@torch.library.custom_op("svdkernels::_kron_linear_dispatch", mutates_args=())
def _kron_linear_dispatch_op(x: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor], scale: float) -> torch.Tensor:
    """Opaque to tracing: every backend of ``kron_linear`` (inputs validated)."""
    _, a1, _ = factor_dims("A", A)
    _, b1, _ = factor_dims("B", B)
    x2 = _flat(x)
    backend = _backend(x)
    if backend == "triton":
        y = _triton_forward(x2, A, B, scale)
    elif backend == "cpp":
        y = cpp_backend.forward(x2, A, B, scale)
    else:
        y = reference.forward(x2, A, B, scale)
    return y.reshape(*x.shape[:-1], a1 * b1)


@triton_op("svdkernels::kron_linear", mutates_args=())
def kron_linear_op(x: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor], scale: float) -> torch.Tensor:
    """``torch.ops.svdkernels.kron_linear``; see :func:`kron_linear`.

    A ``triton_op``: where the call runs compiled Triton kernels, torch.compile traces
    their launches; every other backend is the opaque ``_kron_linear_dispatch``."""
    validate(x, A, B, scale)
    if traced_triton("kron_linear", x.device, has_cpp=True):
        _, a1, _ = factor_dims("A", A)
        _, b1, _ = factor_dims("B", B)
        return _triton_forward(_flat(x), A, B, scale).reshape(*x.shape[:-1], a1 * b1)
    return torch.ops.svdkernels._kron_linear_dispatch(x, A, B, scale)


@_kron_linear_dispatch_op.register_fake
def _(x, A, B, scale):
    validate(x, A, B, scale)
    _, a1, _ = factor_dims("A", A)
    _, b1, _ = factor_dims("B", B)
    return x.new_empty(*x.shape[:-1], a1 * b1)


def _pack_grads(x, gx, gA, gB):
    # Gradients not asked for come back as an empty tensor / empty list.
    gx = gx.reshape(x.shape) if gx is not None else x.new_empty(0)
    return gx, [t.contiguous() for t in gA] if gA else [], [t.contiguous() for t in gB] if gB else []


@torch.library.custom_op("svdkernels::_kron_linear_backward_dispatch", mutates_args=())
def _kron_linear_backward_dispatch_op(
    grad_y: torch.Tensor, x: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor], scale: float,
    needs_x: bool, needs_A: bool, needs_B: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Opaque to tracing: every backend of ``kron_linear_backward``."""
    x2, g2 = _flat(x), _flat(grad_y)
    backend = _backend(x)
    if backend == "triton":
        gx, gA, gB = _triton_backward(g2, x2, A, B, scale, needs_x, needs_A, needs_B)
    elif backend == "cpp":
        gx, gA, gB = cpp_backend.backward(g2, x2, A, B, scale, (needs_x, needs_A, needs_B))
    else:
        gx, gA, gB = reference.backward(g2, x2, A, B, scale, (needs_x, needs_A, needs_B))
    return _pack_grads(x, gx, gA, gB)


@triton_op("svdkernels::kron_linear_backward", mutates_args=())
def kron_linear_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor], scale: float,
    needs_x: bool, needs_A: bool, needs_B: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of ``kron_linear``: ``(∂x, [∂A factors], [∂B factors])``; gradients
    not asked for come back as an empty tensor / empty list. A ``triton_op`` like
    ``kron_linear``."""
    if traced_triton("kron_linear", x.device, has_cpp=True):
        gx, gA, gB = _triton_backward(_flat(grad_y), _flat(x), A, B, scale, needs_x, needs_A, needs_B)
        return _pack_grads(x, gx, gA, gB)
    return torch.ops.svdkernels._kron_linear_backward_dispatch(grad_y, x, A, B, scale, needs_x, needs_A, needs_B)


@_kron_linear_backward_dispatch_op.register_fake
def _(grad_y, x, A, B, scale, needs_x, needs_A, needs_B):
    gx = x.new_empty(x.shape) if needs_x else x.new_empty(0)
    gA = [t.new_empty(t.shape) for t in A] if needs_A else []
    gB = [t.new_empty(t.shape) for t in B] if needs_B else []
    return gx, gA, gB


def _setup_context(ctx, inputs, output):
    x, A, B, scale = inputs
    ctx.save_for_backward(x, *A, *B)
    ctx.n_A = len(A)
    ctx.scale = scale


def _backward(ctx, grad_y):
    x, *factors = ctx.saved_tensors
    A, B = list(factors[: ctx.n_A]), list(factors[ctx.n_A:])
    nx, nA, nB = ctx.needs_input_grad[:3]
    gx, gA, gB = torch.ops.svdkernels.kron_linear_backward(
        grad_y, x, A, B, ctx.scale, bool(nx), bool(nA), bool(nB))
    return (gx if nx else None, gA if nA else None, gB if nB else None, None)


kron_linear_op.register_autograd(_backward, setup_context=_setup_context)


def normalize_factor(name: str, factor: FactorLike) -> list[torch.Tensor]:
    """``A`` as given by a user (``[r,p,q]``, ``[p,q]``, or a pair ``(u, v)`` of
    ``[r,p,k]``/``[p,k]`` and ``[r,k,q]``/``[k,q]``) as the op's factor list."""
    if isinstance(factor, torch.Tensor):
        parts = [factor]
    elif isinstance(factor, (tuple, list)) and len(factor) == 2 and all(isinstance(t, torch.Tensor) for t in factor):
        parts = list(factor)
    else:
        raise TypeError(f"{name}: expected a tensor [r, p, q] or [p, q], or a pair of tensors (u, v) "
                        f"with u @ v the factor, got {type(factor).__name__}")
    dims = {t.dim() for t in parts}
    if len(dims) != 1 or dims.pop() not in (2, 3):
        raise ValueError(f"{name}: expected 2-D ([p, q]) or 3-D ([r, p, q]) tensors of the same rank, "
                         f"got shapes {[tuple(t.shape) for t in parts]}")
    return [t.unsqueeze(0) if t.dim() == 2 else t for t in parts]


def kron_linear(x: torch.Tensor, A: FactorLike, B: FactorLike, *, scale: float = 1.0) -> torch.Tensor:
    """``y = scale · x @ (Σ_i A_i ⊗ B_i)ᵀ``, never forming the Kronecker product.

    The identity ``(A ⊗ B)·vec(X) = vec(B·X·Aᵀ)`` turns the ``(a1·b1)×(a2·b2)``
    matrix-vector product into two small GEMMs per token (Van Loan 2000); it is the
    forward pass of Kronecker adapters (LoKr, KronA, SoKA) without peft's dense
    ``torch.kron``.

    Args:
        x: ``[..., a2*b2]`` float32/bfloat16/float16/float64.
        A: ``[r, a1, a2]`` (or ``[a1, a2]`` for r = 1), or a low-rank pair
            ``(Au [r, a1, k], Av [r, k, a2])`` meaning ``A_i = Au_i @ Av_i``.
        B: ``[r, b1, b2]`` (or ``[b1, b2]``), or ``(Bu [r, b1, k], Bv [r, k, b2])``.
        scale: multiplies the output (LoKr's ``alpha / r``).

    Returns:
        ``y [..., a1*b1]`` in x's dtype, with ``y[..., p*b1 + q]`` the ``(p, q)`` entry
        of ``Σ_i A_i·X·B_iᵀ`` for ``X = x.view(..., a2, b2)``, which matches
        ``torch.kron(A_i, B_i)``'s row/column order. Differentiable in ``x``, ``A``
        and ``B``; neither direction forms a matrix larger than the factors and the
        activations.

    Example::

        x = torch.randn(8, 1024)
        A, B = torch.randn(32, 32), torch.randn(32, 32)
        y = svdkernels.kron_linear(x, A, B)     # == x @ torch.kron(A, B).T
    """
    Af, Bf = normalize_factor("A", A), normalize_factor("B", B)
    validate(x, Af, Bf, scale)
    return torch.ops.svdkernels.kron_linear(x, Af, Bf, float(scale))


class _LinearKron(torch.autograd.Function):
    """``F.linear(x, weight, bias) + kron_linear(x, A, B)`` as one node on the C++
    kernels: the delta is added into the layer's output, and ``∂x`` of the delta into
    ``G·weight``, so neither pass makes an activation-sized temporary or an extra
    pass to sum the two (:func:`linear_kron`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, n_A, *factors):
        A, B = list(factors[:n_A]), list(factors[n_A:])
        x2 = _flat(x).contiguous()
        y = torch.nn.functional.linear(x2, weight, bias)
        cpp_backend.add_(y, x2, A, B, scale)
        ctx.save_for_backward(x2, weight, *factors)
        ctx.scale, ctx.n_A, ctx.x_shape = scale, n_A, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, *factors = ctx.saved_tensors
        A, B = factors[: ctx.n_A], factors[ctx.n_A:]
        needs = ctx.needs_input_grad
        needs_A, needs_B = any(needs[5: 5 + ctx.n_A]), any(needs[5 + ctx.n_A:])
        g2 = _flat(grad_y).contiguous()
        gx = gW = gb = None
        if needs[0]:
            gx = g2 @ weight
            gA, gB = cpp_backend.backward_add_(gx, g2, x2, A, B, ctx.scale, needs_A, needs_B)
            gx = gx.view(ctx.x_shape)
        else:
            _, gA, gB = cpp_backend.backward(g2, x2, A, B, ctx.scale, (False, needs_A, needs_B))
        if needs[1]:
            gW = g2.T @ x2
        if needs[2]:  # False for a None bias
            gb = g2.sum(0)
        return (gx, gW, gb, None, None, *(gA if needs_A else [None] * len(A)), *(gB if needs_B else [None] * len(B)))


def linear_kron(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: FactorLike, B: FactorLike, *,
    scale: float = 1.0,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scale · x @ (Σ_i A_i ⊗ B_i)ᵀ``: a linear layer plus its
    Kronecker adapter (:class:`svdkernels.adapters.KronLinear`'s forward).

    Where the C++ kernels take the call (float32 CPU tensors, eager, the ``cpp``
    backend selected) the two run as one autograd node: the delta is added into the
    layer's output in place, and in the backward ``∂x`` of the delta is added into
    ``grad_y·weight``, so no activation-sized temporary is made and no extra pass sums
    the two. Anywhere else it is ``F.linear(...)`` plus :func:`kron_linear`.

    Args:
        x: ``[..., in]``; weight: ``[out, in]``; bias: ``[out]`` or ``None``.
        A, B: as :func:`kron_linear` (``out = a1·b1``, ``in = a2·b2``).
        scale: multiplies the delta.

    Returns:
        ``y [..., out]``, differentiable in every tensor argument.
    """
    Af, Bf = normalize_factor("A", A), normalize_factor("B", B)
    validate(x, Af, Bf, scale)
    _, a1, _ = factor_dims("A", Af)
    _, b1, _ = factor_dims("B", Bf)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or tuple(weight.shape) != (a1 * b1, x.shape[-1]):
        got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected shape [a1*b1, in] = [{a1 * b1}, {x.shape[-1]}], got {got}")
    tensors = [x, weight, *Af, *Bf] + ([bias] if bias is not None else [])
    fused = (
        not torch.compiler.is_compiling()
        # Plain float32 CPU tensors only: subclasses (DTensor, fake tensors) take the ops.
        and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32
                and t.device.type == "cpu" for t in tensors)
        and _backend(x) == "cpp"
    )
    if not fused:
        # In place: F.linear does not save its output for backward.
        return torch.nn.functional.linear(x, weight, bias).add_(torch.ops.svdkernels.kron_linear(x, Af, Bf, float(scale)))
    return _LinearKron.apply(x, weight, bias, float(scale), len(Af), *Af, *Bf)
