"""Cholesky QR: orthonormal output for ill-conditioned input, no NaN when singular."""
import pytest
import torch

from svdkernels.reference.cholqr import cholqr, cholqr3
from svdkernels.testing.matrices import haar_orthogonal


def _with_condition(kappa: float, m: int = 300, l: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    U = haar_orthogonal((2,), m, l, g)
    V = haar_orthogonal((2,), l, l, g)
    s = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), l, dtype=torch.float64)
    return ((U * s) @ V.mT).float()


@pytest.mark.parametrize("kappa", [1e1, 1e4, 1e6], ids=lambda k: f"kappa{k:g}")
def test_cholqr3_is_orthonormal_and_spans_input(kappa):
    Y = _with_condition(kappa)
    Q = cholqr3(Y)
    eye = torch.eye(Y.shape[-1]).expand(2, -1, -1)
    # float32 orthonormality (a few ulps * sqrt(l)); float64 first Gram makes it hold to kappa 1e6.
    torch.testing.assert_close(Q.mT @ Q, eye, atol=2e-6 * Y.shape[-1], rtol=0)
    # Same span: projecting Y onto Q loses nothing beyond float32 rounding of Y.
    resid = torch.linalg.matrix_norm(Y - Q @ (Q.mT @ Y)) / torch.linalg.matrix_norm(Y)
    assert resid.max() < 1e-5


def test_single_pass_with_float64_gram_is_well_conditioned():
    # One pass is what the range finder uses between passes: cond(Q) ~ 1 + u*kappa.
    Q = cholqr(_with_condition(1e6))
    assert torch.linalg.cond(Q.double()).max() < 1.5


def test_float32_gram_breakdown_falls_back_to_a_finite_basis():
    # kappa 1e8: the float32 Gram is singular to working precision; the shifted
    # Cholesky must still give a finite basis. Shifted CholeskyQR (Fukaya et al.
    # 2020) keeps every direction above sqrt(shift): the part of Y it may lose is
    # bounded by sqrt(11(ml + l(l+1))u) relative.
    Y = _with_condition(1e8)
    m, l = Y.shape[-2:]
    Q = cholqr(Y, gram_dtype=torch.float32)
    assert torch.isfinite(Q).all()
    Qo = cholqr3(Q)
    resid = torch.linalg.matrix_norm(Y - Qo @ (Qo.mT @ Y)) / torch.linalg.matrix_norm(Y)
    bound = (11 * (m * l + l * (l + 1)) * torch.finfo(torch.float32).eps / 2) ** 0.5
    assert resid.max() < bound, (resid, bound)


def test_zero_input_stays_finite():
    assert torch.isfinite(cholqr3(torch.zeros(3, 50, 8))).all()


@pytest.mark.parametrize("mag", [1e15, 1e20, 1e30])
def test_one_dominant_direction_gives_an_orthonormal_basis(mag):
    """A sketch of a matrix with one entry ``mag`` times the rest (κ(Y) ~ mag): the
    shifted first pass leaves κ ~ 1e4, which a float32 second pass used to blow up
    (columns of norm ~1e4). The basis must stay orthonormal where it is not zero and
    keep the dominant direction, so σ₁ of ``QᵀA`` is ``mag``."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(64, 48, generator=g)
    A[3, 5] = mag
    Q = cholqr3((A @ torch.randn(48, 14, generator=g))[None])[0]
    norms = Q.norm(dim=0)
    assert (norms < 1 + 1e-5).all(), norms
    assert abs(float(torch.linalg.svdvals((Q.mT @ A).double())[0]) / mag - 1) < 1e-5
