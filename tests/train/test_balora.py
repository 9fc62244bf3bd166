"""BA-LoRA's regularisers: each term against its definition, gradcheck in float64 on
both singular-value routes, the rsvd route for a large vocabulary, clear errors."""
import math

import pytest
import torch

from svdkernels.testing.errors import assert_raises_naming
from svdkernels.train.balora import balora_loss, consistency_loss, diversity_loss, svd_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_consistency_is_kl_from_base():
    L, B = _logits(2, 3, 7), _logits(2, 3, 7, seed=1)
    p, q = L.softmax(-1), B.softmax(-1)
    want = (q * (q.log() - p.log())).sum(-1).mean()
    torch.testing.assert_close(consistency_loss(L, B), want)
    assert consistency_loss(L, L.clone()).abs() < 1e-12
    Bg = B.clone().requires_grad_(True)
    consistency_loss(L.requires_grad_(True), Bg).backward()
    assert Bg.grad is None and L.grad.abs().sum() > 0  # the base is a target, not trained


def test_diversity_is_minus_topk_entropy():
    L = _logits(4, 11)
    p = L.softmax(-1)
    top = p.sort(-1, descending=True).values[:, :3]
    q = top / top.sum(-1, keepdim=True)
    want = (q * q.log()).sum(-1).mean()
    torch.testing.assert_close(diversity_loss(L, 3), want)
    # uniform top-k: the entropy's maximum log k
    torch.testing.assert_close(diversity_loss(torch.zeros(2, 9, dtype=torch.float64), 4),
                               torch.tensor(-math.log(4), dtype=torch.float64))


@pytest.mark.parametrize("norm", ["nuclear", "fro"])
def test_svd_term_is_topk_over_norm(norm):
    L = _logits(3, 6, 10)
    S = torch.linalg.svd(L).S
    den = S.sum(-1) if norm == "nuclear" else S.pow(2).sum(-1).sqrt()
    want = -(S[:, :2].sum(-1) / den).mean()
    torch.testing.assert_close(svd_loss(L, 2, norm=norm), want)
    torch.testing.assert_close(svd_loss(L, 2, norm=norm, route="rsvd"), want)  # k + 5 >= 6: all of them


def test_total_is_the_weighted_sum():
    L, B = _logits(5, 12), _logits(5, 12, seed=2)
    want = 0.5 * consistency_loss(L, B) + 2.0 * diversity_loss(L, 4) + 0.25 * svd_loss(L, 3)
    torch.testing.assert_close(balora_loss(L, B, consistency=0.5, diversity=2.0, svd=0.25, top_k=4, svd_rank=3),
                               want)
    torch.testing.assert_close(balora_loss(L, B, consistency=0.0, diversity=0.0, svd=1.0, top_k=3),
                               svd_loss(L, 3))


def test_gradcheck_float64():
    L, B = _logits(4, 6).requires_grad_(True), _logits(4, 6, seed=3)
    assert torch.autograd.gradcheck(lambda x: consistency_loss(x, B), (L,))
    assert torch.autograd.gradcheck(lambda x: diversity_loss(x, 3), (L,))
    for norm in ("nuclear", "fro"):
        assert torch.autograd.gradcheck(lambda x: svd_loss(x, 2, norm=norm), (L,))
    # the rsvd route's σ_i = u_iᵀ·L·v_i carries the SVD's gradient (here rsvd is exact: k + 5 >= 4)
    assert torch.autograd.gradcheck(lambda x: svd_loss(x, 2, norm="fro", route="rsvd"), (L,))
    assert torch.autograd.gradcheck(lambda x: balora_loss(x, B, top_k=3, svd_rank=2), (L,))


def test_large_vocab_uses_rsvd_and_matches_exact():
    gen = torch.Generator().manual_seed(0)
    # rank-6 logits: rsvd of rank k + 5 = 8 recovers the spectrum exactly
    L = (torch.randn(12, 6, generator=gen, dtype=torch.float64)
         @ torch.randn(6, 5000, generator=gen, dtype=torch.float64)).requires_grad_(True)
    import svdkernels.train.balora as mod

    calls = []
    real = mod.rsvd
    mod.rsvd = lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    try:
        fast = svd_loss(L, 3, norm="fro")  # auto: V > 4096
    finally:
        mod.rsvd = real
    assert calls == [8]
    exact = svd_loss(L, 3, norm="fro", route="exact")
    torch.testing.assert_close(fast, exact, rtol=1e-9, atol=0)
    g_fast, = torch.autograd.grad(fast, L)
    g_exact, = torch.autograd.grad(exact, L)
    torch.testing.assert_close(g_fast, g_exact, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(svd_loss(L, 3), svd_loss(L, 3, route="exact"), rtol=1e-9, atol=0)


def test_errors():
    L = _logits(3, 5)
    assert_raises_naming(lambda: diversity_loss(L, 6), ValueError, ["top_k", "<= 5", "6"])
    assert_raises_naming(lambda: svd_loss(L, 4), ValueError, ["top_k", "<= 3", "4"])
    assert_raises_naming(lambda: svd_loss(L, 2, norm="l1"), ValueError, ["norm", "'nuclear'", "'l1'"])
    assert_raises_naming(lambda: svd_loss(L, 2, route="full"), ValueError, ["route", "'rsvd'", "'full'"])
    assert_raises_naming(lambda: consistency_loss(L, L[:2]), ValueError, ["base_logits", "[3, 5]", "[2, 5]"])
    assert_raises_naming(lambda: balora_loss(L, L, svd=-1.0), ValueError, ["svd", ">= 0", "-1.0"])
    assert_raises_naming(lambda: balora_loss(L[0], L[0]), TypeError, ["logits", "[..., N, V]"])
    assert_raises_naming(lambda: balora_loss(L.long(), L), TypeError, ["logits", "int64"])
