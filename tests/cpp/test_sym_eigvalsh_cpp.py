"""The C++ symmetric eigenvalue kernel (csrc/cpu/sym_eigvalsh*.cpp), every
instruction-set path this CPU runs, against float64 LAPACK (``torch.linalg.eigvalsh``):
float64 (Householder + QL) and float32 (Householder + bisection), sizes that leave
remainders in every vector loop, matrices that are already (block) diagonal or
tridiagonal, clustered and PSD spectra, thread-count independence, the Python
wrapper's dispatch and the internal op's contract.

Skipped when svdkernels._C is not built, unless SVDKERNELS_REQUIRE_EXTENSION=1.
"""

import pytest
import torch

from svdkernels.backends import use_backend
from svdkernels.ops.sym_eigvalsh import sym_eigvalsh

from cpp_support import ISA_NAMES, isas, require_extension  # noqa: E402 (tests/cpp on sys.path)

require_extension()

OPS = torch.ops.svdkernels
ISAS = isas()
# Backward stable in each precision: |λ̂ − λ| ≤ c·n·u·‖G‖ (LAPACK's own bound's form).
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def check(got: torch.Tensor, G: torch.Tensor, what: str) -> None:
    want = torch.linalg.eigvalsh(G.double())
    n = G.shape[-1]
    scale = torch.linalg.matrix_norm(G.double(), ord=2).clamp_min(1e-300).unsqueeze(-1)
    err = float(((got.double() - want).abs() / scale).max())
    assert got.dtype == G.dtype and got.shape == want.shape, what
    assert err <= 2 * n * UNIT[G.dtype], f"{what}: {err:.3g} > 2·n·u"
    assert bool((got[..., 1:] >= got[..., :-1]).all()), f"{what}: not ascending"


def random_sym(B: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    A = torch.randn(B, n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (A + A.mT).to(dtype)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 17, 33, 70])
def test_random_symmetric_matches_lapack(n: int, dtype: torch.dtype, isa: int) -> None:
    G = random_sym(3, n, dtype, seed=n)
    check(OPS._cpp_sym_eigvalsh(G, isa), G, f"n={n}")


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_structured_matrices(dtype: torch.dtype, isa: int) -> None:
    n = 24
    gen = torch.Generator().manual_seed(1)
    diag = torch.diag_embed(torch.randn(n, generator=gen, dtype=torch.float64))
    tri = diag + torch.diag_embed(torch.randn(n - 1, generator=gen, dtype=torch.float64), 1)
    tri = tri + torch.diag_embed(tri.diagonal(1), -1)
    block = torch.block_diag(*(random_sym(1, 6, torch.float64, seed=s)[0] for s in range(4)))
    clustered = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    levels = torch.tensor([1.0] * 12 + [1.0 + 1e-9] * 6 + [-3.0] * 6, dtype=torch.float64)
    clustered = clustered @ torch.diag(levels) @ clustered.T
    X = torch.randn(60, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -6, n, dtype=torch.float64)
    psd = X.T @ X  # a Gram with a 1e12 range, the use of singular_values
    zero = torch.zeros(n, n, dtype=torch.float64)
    identity = torch.eye(n, dtype=torch.float64) * 1e30  # large entries: no overflow in the squares
    for name, G in dict(diag=diag, tri=tri, block=block, clustered=clustered, psd=psd, zero=zero,
                        identity=identity).items():
        G = G.to(dtype)
        check(OPS._cpp_sym_eigvalsh(G[None], isa), G[None], name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reads_the_lower_triangle_only(dtype: torch.dtype) -> None:
    G = random_sym(2, 19, dtype)
    junk = G.tril() + torch.full_like(G, float("nan")).triu(1)
    torch.testing.assert_close(OPS._cpp_sym_eigvalsh(junk, -1), OPS._cpp_sym_eigvalsh(G, -1), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_isa_paths_agree_and_threads_do_not_change_results(dtype: torch.dtype) -> None:
    G = random_sym(5, 45, dtype, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS._cpp_sym_eigvalsh(G, -1)
        torch.set_num_threads(2)
        two = OPS._cpp_sym_eigvalsh(G, -1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # one matrix per task: the same arithmetic
    # Per-matrix results do not depend on the batch around them either.
    assert torch.equal(OPS._cpp_sym_eigvalsh(G[2:3], -1), one[2:3])
    for isa in ISAS:
        check(OPS._cpp_sym_eigvalsh(G, isa), G, ISA_NAMES[isa])


def test_wrapper_dispatch_and_fallbacks(monkeypatch) -> None:
    G = random_sym(1, 12, torch.float64).reshape(1, 1, 12, 12).expand(2, 3, 12, 12)  # leading dims, strides
    calls = []
    real = torch.ops.svdkernels._cpp_sym_eigvalsh

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return real(*args)

    monkeypatch.setattr(torch.ops.svdkernels, "_cpp_sym_eigvalsh", Spy())
    got = sym_eigvalsh(G)
    assert calls == [torch.Size([6, 12, 12])] and got.shape == (2, 3, 12)
    torch.testing.assert_close(got, torch.linalg.eigvalsh(G), rtol=0, atol=1e-13)
    # No C++ kernel for these: torch's eigvalsh, same values.
    with use_backend("reference"):
        sym_eigvalsh(G)
    sym_eigvalsh(G.to(torch.float16).float().requires_grad_(True))  # needs a gradient
    sym_eigvalsh(G.to(torch.complex128))
    assert len(calls) == 1


def test_errors() -> None:
    G = random_sym(2, 6, torch.float64)
    with pytest.raises(ValueError, match=r"G: expected a tensor of shape \[\.\.\., n, n\], got shape \(2, 6, 5\)"):
        sym_eigvalsh(G[..., :5])
    with pytest.raises(TypeError, match="G: expected a torch.Tensor, got list"):
        sym_eigvalsh([[1.0]])
    with pytest.raises(TypeError, match="isa: expected an int, got str"):
        sym_eigvalsh(G, isa="avx2")
    with pytest.raises(ValueError, match=r"isa: expected -1 \(auto\) or 0\.\."):
        OPS._cpp_sym_eigvalsh(G, 9)
    with pytest.raises(TypeError, match="G: expected dtype float32 or float64, got Half"):
        OPS._cpp_sym_eigvalsh(G.half(), -1)
    with pytest.raises(ValueError, match=r"G: expected shape \[B, n, n\]"):
        OPS._cpp_sym_eigvalsh(G[0], -1)
    bad = G.clone()
    bad[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"G: expected finite values, got NaN or inf entries \(matrix 1 of"):
        sym_eigvalsh(bad)
    assert OPS._cpp_sym_eigvalsh(G[:0], -1).shape == (0, 6)
