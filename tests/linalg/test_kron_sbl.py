"""kron_sbl: KroSBL against plain SBL and OMP on synthetic IRS-MIMO-like data, in the same run."""
from __future__ import annotations

import pytest
import torch

import svdkernels.linalg as linalg
from svdkernels.linalg.kron_sbl import nearest_kron_vector
from svdkernels.testing.errors import assert_raises_naming

C128 = torch.complex128


def _cgauss(*shape, g):
    return torch.complex(torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g, dtype=torch.float64))


def _kron(vs):
    out = vs[0]
    for v in vs[1:]:
        out = torch.kron(out, v)
    return out


def irs_mimo_case(seed: int, L: int = 8, rows: tuple[int, ...] = (4, 4, 4), s: int = 2, snr_db: float = 20.0):
    """A channel sparse in angle (AoA × AoD × IRS angle: ``s`` paths per dimension,
    so a Kronecker-structured support of ``s³`` of ``L³`` entries) seen through three
    random complex pilot matrices ``Φ_i [rows_i, L]``, at ``snr_db``."""
    g = torch.Generator().manual_seed(seed)
    Phis = [_cgauss(m, L, g=g) / (2 * m) ** 0.5 for m in rows]
    parts = []
    for _ in rows:
        v = torch.zeros(L, dtype=C128)
        v[torch.randperm(L, generator=g)[:s]] = _cgauss(s, g=g)
        parts.append(v)
    x = _kron(parts)
    y0 = _kron(Phis) @ x
    noise_var = float(y0.abs().pow(2).mean()) / 10 ** (snr_db / 10)
    y = y0 + (noise_var / 2) ** 0.5 * _cgauss(y0.shape[0], g=g)
    return y, Phis, x


def omp(y: torch.Tensor, Phi: torch.Tensor, k: int) -> torch.Tensor:
    """Orthogonal matching pursuit with the true sparsity ``k`` (an oracle advantage)."""
    norms = Phi.norm(dim=0)
    r, chosen = y.clone(), []
    for _ in range(k):
        corr = (Phi.mH @ r).abs() / norms
        corr[chosen] = -1
        chosen.append(int(corr.argmax()))
        coef = torch.linalg.lstsq(Phi[:, chosen], y.unsqueeze(-1)).solution[:, 0]
        r = y - Phi[:, chosen] @ coef
    x = torch.zeros(Phi.shape[1], dtype=y.dtype)
    x[chosen] = coef
    return x


def nmse(xh: torch.Tensor, x: torch.Tensor) -> float:
    return float((xh - x).norm() ** 2 / x.norm() ** 2)


def support_recovery(xh: torch.Tensor, x: torch.Tensor) -> float:
    """Fraction of the true support among the ``|supp x|`` largest entries of ``xh``."""
    true = set((x != 0).nonzero()[:, 0].tolist())
    return len(true & set(xh.abs().topk(len(true)).indices.tolist())) / len(true)


def test_krosbl_beats_plain_sbl_and_omp():
    # 64 measurements of 512 unknowns (8 non-zero), 20 dB. Measured, seeds 0-3:
    # KroSBL NMSE 0.0023-0.0072 (support 0.875-1), SBL 0.031-0.10, OMP 0.002-1.35.
    res = {"krosbl": [], "sbl": [], "omp": []}
    for seed in range(4):
        y, Phis, x = irs_mimo_case(seed)
        kro = linalg.kron_sbl(y, Phis)
        sbl = linalg.kron_sbl(y, Phis, structured=False)
        o = omp(y, _kron(Phis), int((x != 0).sum()))
        for name, xh in (("krosbl", kro.x), ("sbl", sbl.x), ("omp", o)):
            res[name].append((nmse(xh, x), support_recovery(xh, x)))
        assert len(kro.factors) == 3 and all(f.shape == (8,) for f in kro.factors)
        torch.testing.assert_close(kro.gamma, torch.where(kro.gamma > 0, _kron(list(kro.factors)), 0.0))
    mean = {k: torch.tensor(v, dtype=torch.float64).mean(0) for k, v in res.items()}
    assert mean["krosbl"][0] < 0.5 * mean["sbl"][0] and mean["krosbl"][0] < mean["omp"][0], mean
    assert mean["krosbl"][1] >= max(mean["sbl"][1], mean["omp"][1]), mean


def test_real_dictionary_and_known_noise():
    g = torch.Generator().manual_seed(5)
    P1, P2 = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 10, generator=g, dtype=torch.float64)
    x1, x2 = torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)
    x1[[1, 7]], x2[[3]] = torch.tensor([1.0, -2.0], dtype=torch.float64), 1.5
    x = torch.kron(x1, x2)
    y = torch.kron(P1, P2) @ x + 1e-3 * torch.randn(36, generator=g, dtype=torch.float64)
    r = linalg.kron_sbl(y, [P1, P2], noise_var=1e-6)
    assert r.noise_var == 1e-6 and r.x.dtype == torch.float64
    assert nmse(r.x, x) < 1e-4, nmse(r.x, x)
    assert set((r.gamma > 0).nonzero()[:, 0].tolist()) == set((x != 0).nonzero()[:, 0].tolist())


def test_nearest_kron_vector_is_exact_on_a_kronecker_product():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(n, generator=g, dtype=torch.float64) for n in (3, 4, 5))
    factors = nearest_kron_vector(_kron([a, b, c]), [3, 4, 5])
    torch.testing.assert_close(_kron(list(factors)), _kron([a, b, c]))


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: linalg.kron_sbl(torch.randn(12), [torch.randn(3, 4), torch.randn(5, 4)]), ValueError,
         ["Phi_factors", "len(y) = 12", "3 * 5 = 15"]),
        (lambda: linalg.kron_sbl(torch.randn(12), []), TypeError, ["Phi_factors", "non-empty"]),
        (lambda: linalg.kron_sbl(torch.randn(12), [torch.randn(12)]), ValueError, ["Phi_factors[0]", "[M_i, L_i]", "(12,)"]),
        (lambda: linalg.kron_sbl(torch.randn(3, 4), [torch.randn(3, 4)]), ValueError, ["y", "[M]", "(3, 4)"]),
        (lambda: linalg.kron_sbl(torch.full((3,), float("nan")), [torch.randn(3, 4)]), ValueError, ["y", "finite"]),
        (lambda: linalg.kron_sbl(torch.randn(3), [torch.randn(3, 4)], tol=0), ValueError, ["tol", "(0, 1)", "0"]),
        (lambda: linalg.kron_sbl(torch.randn(3), [torch.randn(3, 4)], noise_var=-1.0), ValueError, ["noise_var", "> 0", "-1.0"]),
        (lambda: linalg.kron_sbl(torch.randn(3), [torch.randn(3, 4)], max_iter=0), ValueError, ["max_iter", ">= 1", "0"]),
    ],
    ids=["rows", "empty", "vector-factor", "y-2d", "y-nan", "tol", "noise_var", "max_iter"],
)
def test_bad_input_names_the_argument(call, exc, words):
    assert_raises_naming(call, exc, words)
