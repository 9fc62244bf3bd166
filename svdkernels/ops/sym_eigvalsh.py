"""Eigenvalues of batches of symmetric matrices, one matrix per CPU thread.

``sym_eigvalsh(G)`` equals ``torch.linalg.eigvalsh(G)`` (ascending, to the rounding
of a backward-stable solver: each value exact for a matrix within ~p(n)·u·‖G‖ of
``G``). ``torch.linalg.eigvalsh`` solves the matrices of a batch one after the
other, and LAPACK's ``?syevd`` on one matrix of a few hundred rows barely uses a
second thread. The C++ kernel (``csrc/cpu/sym_eigvalsh.cpp``, internal op
``torch.ops.svdkernels._cpp_sym_eigvalsh``) hands whole matrices to threads and
reduces each with a Householder tridiagonalisation whose rank-2 update and next
matrix-vector product share one pass over the triangle (Golub & Van Loan, Matrix
Computations, Alg. 8.3.1), then implicit QL with Wilkinson shifts (Bowdler et al.
1968) on the tridiagonal; results do not depend on the thread count.

It runs for CPU float32/float64 tensors that need no gradient when ``svdkernels._C``
is built, unless ``use_backend("reference")`` (or ``"triton"``: no kernel of this
op) is in force; anything else goes to ``torch.linalg.eigvalsh``.
"""
from __future__ import annotations

import torch

from svdkernels.backends import requested_backend, select_backend

__all__ = ["sym_eigvalsh"]

CPP_DTYPES = (torch.float32, torch.float64)


def cpp_supports(G: torch.Tensor) -> bool:
    """Whether the C++ kernel can run this call: a CPU float32/float64 tensor that
    needs no gradient (the kernel has no backward)."""
    return G.device.type == "cpu" and G.dtype in CPP_DTYPES and not (G.requires_grad and torch.is_grad_enabled())


def sym_eigvalsh(G: torch.Tensor, *, isa: int = -1) -> torch.Tensor:
    """Eigenvalues of every symmetric matrix of a batch, ascending.

    Args:
        G: ``[..., n, n]`` symmetric floating tensor (only its lower triangle is read,
            as ``torch.linalg.eigvalsh(G, UPLO="L")``).
        isa: instruction set of the C++ kernel: -1 the best this CPU runs, 0 portable
            C++, 1 AVX2+FMA, 2 AVX-512F (tests force each path).

    Returns:
        ``[..., n]`` in ``G``'s dtype, ascending.
    """
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G: expected a torch.Tensor, got {type(G).__name__}")
    if G.dim() < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"G: expected a tensor of shape [..., n, n], got shape {tuple(G.shape)}")
    if isinstance(isa, bool) or not isinstance(isa, int):
        raise TypeError(f"isa: expected an int, got {type(isa).__name__}")
    # Only "cpp" has a kernel here: a forced "reference" (or "triton", which has none)
    # runs torch's; a forced "cpp" without the extension raises in select_backend.
    forced = requested_backend()
    if forced in (None, "cpp") and cpp_supports(G) and select_backend("sym_eigvalsh", G.device, has_cpp=True) == "cpp":
        import svdkernels._C  # noqa: F401 - registers the internal op

        n = G.shape[-1]
        out = torch.ops.svdkernels._cpp_sym_eigvalsh(G.reshape(-1, n, n), isa)
        return out.reshape(G.shape[:-1])
    return torch.linalg.eigvalsh(G)
