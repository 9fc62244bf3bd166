"""Reference ``kron_linear``: a linear map by a sum of Kronecker products, never formed.

For ``W = Σ_i A_i ⊗ B_i`` (``A_i`` is ``a1×a2``, ``B_i`` is ``b1×b2``, so ``W`` is
``(a1·b1)×(a2·b2)``) the identity ``(A ⊗ B)·vec(X) = vec(B·X·Aᵀ)`` (Van Loan 2000,
"The ubiquitous Kronecker product") gives, with an input row viewed as the
``a2×b2`` matrix ``X[n]`` (row-major, so ``x[n, s·b2 + t] = X[n, s, t]``)::

    Y[n] = Σ_i A_i · X[n] · B_iᵀ        (a1×b1, and y[n, p·b1 + q] = Y[n, p, q])

Two GEMMs over the activations and no copy of them:

1. ``Z = X·[B_1; …; B_r]ᵀ``: one GEMM of ``[N·a2, b2]`` by ``[b2, r·b1]``. Its
   output ``[N, a2, r, b1]`` is, per token, an ``(a2·r)×b1`` matrix with rows
   ordered ``(s, i)``.
2. ``Y[n] = Â·Z[n]`` with ``Â[p, (s, i)] = A_i[p, s]`` (``a1×(a2·r)``, a
   rearrangement of the factors, not of the activations).

FLOPs ``2·N·r·a2·b1·(b2 + a1)`` against ``2·N·a1·a2·b1·b2`` for the dense map: with
``a ≈ b ≈ √d`` the adapter costs ``2r/√d`` of the frozen layer.

A factor may be given in low-rank form ``B_i = Bu_i·Bv_i`` (peft LoKr's
``w2_a·w2_b``). ``B`` is then applied as the two thin products when that saves
FLOPs, else composed (its size is that of the dense factor, ``b1×b2``, a small
fraction of ``W``). ``A`` is always composed: it meets the smaller, already
contracted intermediate.

The backward pass reuses the same two GEMMs: ``∂x`` is ``kron_linear`` with the
transposed factors, ``∂A`` and ``∂B`` are contractions of the output gradient with
one-sided products of the input; none forms ``W``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

Factor = Sequence[torch.Tensor]  # [dense] or [u, v] with dense = u @ v

# Elements of the intermediate Z per token chunk (2 MiB in float32: within L2/L3).
_CHUNK_ELEMENTS = 1 << 19


def compose(factor: Factor) -> torch.Tensor:
    """The dense factor ``[r, p, q]`` of ``[dense]`` or ``[u [r,p,k], v [r,k,q]]``."""
    return factor[0] if len(factor) == 1 else torch.matmul(factor[0], factor[1])


def factor_dims(factor: Factor) -> tuple[int, int, int]:
    """``(r, p, q)`` of a factor given densely or in low-rank form."""
    if len(factor) == 1:
        r, p, q = factor[0].shape
        return r, p, q
    return factor[0].shape[0], factor[0].shape[1], factor[1].shape[2]


def _apply_lowrank_first(factor: Factor) -> bool:
    # Two thin GEMMs (k·(p+q) FLOPs per row) run at a fraction of the rate of one
    # dense GEMM (p·q): on the CPU, k = 8 and p = q = 32 (half the FLOPs) measured
    # 2x slower. So only a saving of 4x or more in FLOPs takes the thin path.
    if len(factor) == 1:
        return False
    _, p, q = factor_dims(factor)
    k = factor[0].shape[2]
    return 4 * k * (p + q) <= p * q


def _right_contract(X2: torch.Tensor, B: Factor) -> torch.Tensor:
    """``Z [M, r, b1]`` with ``Z[m, i] = B_i · X2[m]`` for ``X2 [M, b2]``."""
    r, b1, b2 = factor_dims(B)
    M = X2.shape[0]
    if not _apply_lowrank_first(B):
        Bd = compose(B)
        return torch.matmul(X2, Bd.reshape(r * b1, b2).t()).view(M, r, b1)
    Bu, Bv = B
    k = Bu.shape[2]
    T = torch.matmul(X2, Bv.reshape(r * k, b2).t())  # [M, r·k]
    if r == 1:
        return torch.matmul(T, Bu[0].t()).view(M, 1, b1)
    # einsum may return a permuted layout; the caller views Z as [N, a2·r, b1].
    return torch.einsum("mik,iqk->miq", T.view(M, r, k), Bu).contiguous()


def _left_contract(
    Z: torch.Tensor, A: Factor, N: int, scale: float, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Y [N, a1, b1]`` with ``Y[n] = scale · Σ_i A_i · Z_i[n]`` for ``Z [N·a2, r, b1]``."""
    r, a1, a2 = factor_dims(A)
    b1 = Z.shape[-1]
    A_hat = compose(A).permute(1, 2, 0).reshape(a1, a2 * r)  # Â[p, (s,i)] = A_i[p, s]
    if scale != 1.0:
        A_hat = A_hat * scale
    if out is not None:
        return torch.matmul(A_hat, Z.view(N, a2 * r, b1), out=out)
    return torch.matmul(A_hat, Z.view(N, a2 * r, b1))


def forward(x: torch.Tensor, A: Factor, B: Factor, scale: float) -> torch.Tensor:
    """``y [N, a1·b1] = scale · x [N, a2·b2] @ (Σ_i A_i ⊗ B_i)ᵀ``.

    ``A`` is ``[A [r,a1,a2]]`` or ``[Au [r,a1,k], Av [r,k,a2]]``; ``B`` likewise with
    ``b1, b2``. ``x`` is 2-D; the op layer flattens leading dims.
    """
    r, a1, a2 = factor_dims(A)
    _, b1, b2 = factor_dims(B)
    N = x.shape[0]
    x = x.reshape(N, a2 * b2)
    A = [compose(A)]  # once, not per chunk
    B = B if _apply_lowrank_first(B) else [compose(B)]
    # Token chunks keep the intermediate Z cache-resident: a fresh activation-sized
    # buffer costs more in page faults and DRAM traffic than its GEMM (measured 2x
    # on the CPU at d = 4096), and the chunks' outputs land in y directly.
    step = max(1, _CHUNK_ELEMENTS // (a2 * r * b1))
    if step >= N:
        Z = _right_contract(x.reshape(N * a2, b2), B)  # [N·a2, r, b1] = per token [(s,i), q]
        return _left_contract(Z, A, N, scale).view(N, a1 * b1)
    y = x.new_empty(N, a1 * b1)
    for n0 in range(0, N, step):
        xc = x[n0:n0 + step]
        n = xc.shape[0]
        Z = _right_contract(xc.reshape(n * a2, b2), B)
        _left_contract(Z, A, n, scale, out=y[n0:n0 + n].view(n, a1, b1))
    return y


def transpose(factor: Factor) -> list[torch.Tensor]:
    """The factor of ``Σ A_iᵀ ⊗ B_iᵀ`` (views; ``(u·v)ᵀ = vᵀ·uᵀ``)."""
    if len(factor) == 1:
        return [factor[0].transpose(1, 2)]
    return [factor[1].transpose(1, 2), factor[0].transpose(1, 2)]


def chain(factor: Factor, grad_dense: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of a factor's tensors (``[dense]`` or ``[u, v]``) from that of the
    composed ``[r, p, q]`` factor."""
    if len(factor) == 1:
        return [grad_dense]
    u, v = factor
    return [torch.matmul(grad_dense, v.transpose(1, 2)), torch.matmul(u.transpose(1, 2), grad_dense)]


def backward(
    grad_y: torch.Tensor, x: torch.Tensor, A: Factor, B: Factor, scale: float,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Gradients ``(∂x, [∂A factors], [∂B factors])`` of :func:`forward`.

    ``grad_y [N, a1·b1]``, ``x [N, a2·b2]``; ``needs`` says which are wanted.
    ``∂A_i = scale · Σ_n G[n]·B_i·X[n]ᵀ`` and ``∂B_i = scale · Σ_n G[n]ᵀ·A_i·X[n]``,
    each one GEMM over the activations plus a contraction over tokens.
    """
    r, a1, a2 = factor_dims(A)
    _, b1, b2 = factor_dims(B)
    N = x.shape[0]
    G = grad_y.reshape(N, a1, b1)
    X = x.reshape(N, a2, b2)
    Ad = compose(A)
    At, Bt = [Ad.transpose(1, 2)], transpose(B if _apply_lowrank_first(B) else [compose(B)])
    A_pi = Ad.transpose(0, 1).reshape(a1 * r, a2)  # [(p,i), s]
    grad_x = x.new_empty(N, a2 * b2) if needs[0] else None
    g_A = x.new_zeros(a1 * r, a2) if needs[1] else None
    g_B = x.new_zeros(b1, r * b2) if needs[2] else None
    # Token chunks, as in the forward pass: the activation-sized intermediates V and
    # U stay in cache, ∂x is written in place and ∂A, ∂B accumulate.
    step = max(1, _CHUNK_ELEMENTS // (r * max(a1 * b2, a2 * b1)))
    for n0 in range(0, N, step):
        Gc, Xc = G[n0:n0 + step], X[n0:n0 + step]
        n = Gc.shape[0]
        if needs[0] or needs[1]:
            # V[n, (p,i), t] = Σ_q G[n,p,q]·B_i[q,t], shared: ∂x[n] = Σ_i A_iᵀ·V_i[n] (the
            # forward pass with transposed factors) and ∂A_i = Σ_n V_i[n]·X[n]ᵀ.
            V = _right_contract(Gc.reshape(n * a1, b1), Bt)  # [n·a1, r, b2]
        if needs[0]:
            _left_contract(V, At, n, scale, out=grad_x[n0:n0 + n].view(n, a2, b2))
        if needs[1]:
            # Per-token GEMMs then a sum over tokens: no transposed copy of V or X
            # (1.6x faster than a permute-and-GEMM on the CPU).
            g_A += torch.bmm(V.view(n, a1 * r, b2), Xc.transpose(1, 2)).sum(0)  # [(p,i), s]
        if needs[2]:
            # U[n, (p,i), t] = Σ_s A_i[p,s]·X[n,s,t]; ∂B_i[q,t] = Σ_{n,p} G[n,p,q]·U[n,(p,i),t].
            U = torch.matmul(A_pi, Xc).view(n * a1, r * b2)
            g_B += torch.matmul(U.t(), Gc.reshape(n * a1, b1)).t()  # [b1, r·b2]
    grad_A = grad_B = None
    if needs[1]:
        grad_A = chain(A, (g_A * scale).view(a1, r, a2).transpose(0, 1).contiguous())
    if needs[2]:
        grad_B = chain(B, (g_B * scale).view(b1, r, b2).transpose(0, 1).contiguous())
    return grad_x, grad_A, grad_B
