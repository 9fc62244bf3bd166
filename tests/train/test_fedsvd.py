"""FedSVD: the thin aggregation equals the dense SVD route and never forms out×in;
DP-SGD's per-sample clipping and noise; the simulated driver's three modes; the
non-IID split; clear errors."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from svdkernels.adapters import adapt
from svdkernels.bench.train_methods_fed import fed_task, run_mode
from svdkernels.testing.errors import assert_raises_naming
from svdkernels.train.fedsvd import FedSVD, dirichlet_split, dp_gradients, fedsvd_aggregate, fedsvd_aggregate_dense

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:There is a performance drop")]


def _clients(K, m, n, r, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(m, r, generator=gen, dtype=dtype) for _ in range(K)], torch.randn(r, n, generator=gen,
                                                                                            dtype=dtype)


@pytest.mark.parametrize("m,n", [(40, 24), (24, 40)])
def test_aggregate_equals_dense_svd_float64(m, n):
    Bs, A = _clients(3, m, n, 6, torch.float64)
    B1, A1 = fedsvd_aggregate(Bs, A)
    B2, A2 = fedsvd_aggregate_dense(Bs, A)
    assert B1.shape == (m, 6) and A1.shape == (6, n)
    torch.testing.assert_close(B1, B2, rtol=0, atol=1e-10)
    torch.testing.assert_close(A1, A2, rtol=0, atol=1e-10)
    # the product is the average client product, A has orthonormal rows, B's columns are U·S
    torch.testing.assert_close(B1 @ A1, torch.stack(Bs).mean(0) @ A, rtol=0, atol=1e-12)
    torch.testing.assert_close(A1 @ A1.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    G = B1.T @ B1
    torch.testing.assert_close(G, torch.diag(G.diagonal()), rtol=0, atol=1e-10)
    assert (G.diagonal()[:-1] >= G.diagonal()[1:]).all()


def test_aggregate_float32_and_weights():
    Bs, A = _clients(4, 64, 48, 8, torch.float32, seed=1)
    w = [1.0, 2.0, 3.0, 4.0]
    B1, A1 = fedsvd_aggregate(torch.stack(Bs), A, weights=w)
    B2, A2 = fedsvd_aggregate_dense(Bs, A, weights=w)
    ref = sum(wi * B for wi, B in zip(w, Bs)) / 10 @ A
    scale = ref.abs().max()
    assert (B1 @ A1 - ref).abs().max() / scale < 1e-5
    assert (B1 @ A1 - B2 @ A2).abs().max() / scale < 1e-5
    assert (A1 @ A1.T - torch.eye(8)).abs().max() < 1e-5


def test_aggregate_of_zero_B_orthonormalises_A():
    A = torch.randn(4, 20, dtype=torch.float64)
    B, A1 = fedsvd_aggregate([torch.zeros(10, 4, dtype=torch.float64)], A)
    assert B.abs().max() == 0
    torch.testing.assert_close(A1 @ A1.T, torch.eye(4, dtype=torch.float64))
    # same row space as A: projecting A's rows on A1's rows changes nothing
    torch.testing.assert_close(A @ A1.T @ A1, A)


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append((str(func), tuple(t.shape)))
        return out


def test_thin_route_never_forms_out_by_in():
    Bs, A = _clients(3, 96, 80, 4, torch.float32)
    with _Shapes() as rec:
        fedsvd_aggregate(Bs, A)
    biggest = max(s[0] * s[1] if len(s) == 2 else 0 for _, s in rec.numels)
    assert biggest <= 3 * 96 * 4 + 96 * 80 // 8, rec.numels  # factor-sized, not 96×80
    assert not any(s == (96, 80) for _, s in rec.numels)
    with _Shapes() as rec:
        fedsvd_aggregate_dense(Bs, A)
    assert any(s == (96, 80) for _, s in rec.numels)  # the check can see a dense product


def test_aggregate_errors():
    Bs, A = _clients(2, 10, 8, 3, torch.float32)
    assert_raises_naming(lambda: fedsvd_aggregate([Bs[0], torch.zeros(11, 3)], A), ValueError,
                         ["B_clients[1]", "[10, 3]", "[11, 3]"])
    assert_raises_naming(lambda: fedsvd_aggregate([], A), ValueError, ["B_clients", "at least one"])
    assert_raises_naming(lambda: fedsvd_aggregate(Bs, A[:2]), ValueError, ["r = 2", "[10, 3]"])
    assert_raises_naming(lambda: fedsvd_aggregate([torch.zeros(2, 3)], torch.zeros(3, 8)), ValueError,
                         ["A", "min(out, in) = 2", "r = 3"])
    assert_raises_naming(lambda: fedsvd_aggregate([B.double() for B in Bs], A), ValueError,
                         ["B_clients[0]", "float32", "float64"])
    assert_raises_naming(lambda: fedsvd_aggregate(Bs, A[0]), TypeError, ["A", "2-D"])
    assert_raises_naming(lambda: fedsvd_aggregate(Bs, A, weights=[1.0]), ValueError, ["weights", "2"])
    assert_raises_naming(lambda: fedsvd_aggregate(Bs, A, weights=[1.0, float("nan")]), ValueError,
                         ["weights[1]", "nan"])


def _model(seed=0):
    torch.manual_seed(seed)
    return adapt(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), "lora", rank=2, seed=seed)


def _ce(logits, y):
    return nn.functional.cross_entropy(logits, y)


def test_dp_gradients_clip_and_noise():
    m = _model()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    params = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith("lora_B")}
    gen = torch.Generator().manual_seed(0)
    # per-sample gradients by a loop, the definition
    from torch.func import functional_call

    per = []
    for i in range(5):
        ps = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        g = torch.autograd.grad(_ce(functional_call(m, ps, (x[i:i + 1],)), y[i:i + 1]), list(ps.values()))
        per.append(dict(zip(ps, g)))
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in d.values())) for d in per])
    clip = float(norms.median())
    got = dp_gradients(m, params, x, y, loss_fn=_ce, clip=clip, noise_multiplier=0.0, generator=gen)
    for n in params:
        want = sum(d[n] * min(1.0, clip / float(nm)) for d, nm in zip(per, norms)) / 5
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-7)
    # huge clip: the plain mean gradient
    big = dp_gradients(m, params, x, y, loss_fn=_ce, clip=1e6, noise_multiplier=0.0, generator=gen)
    for n in params:
        torch.testing.assert_close(big[n], sum(d[n] for d in per) / 5, rtol=1e-5, atol=1e-7)
    # noise: N(0, (σ·clip)²)/b per entry, reproducible from the generator
    a = dp_gradients(m, params, x, y, loss_fn=_ce, clip=clip, noise_multiplier=2.0,
                     generator=torch.Generator().manual_seed(3))
    b = dp_gradients(m, params, x, y, loss_fn=_ce, clip=clip, noise_multiplier=2.0,
                     generator=torch.Generator().manual_seed(3))
    for n in params:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    gen = torch.Generator().manual_seed(3)
    for n in params:  # the same draws, in order
        noise = torch.randn(got[n].shape, generator=gen) * 2.0 * clip / 5
        torch.testing.assert_close(a[n] - got[n], noise, rtol=1e-4, atol=1e-6)


def test_driver_modes_one_round():
    m = _model()
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    clients = [(x[:10], y[:10]), (x[10:], y[10:])]
    for mode in ("fedsvd", "lora", "ffa"):
        fed = FedSVD(copy.deepcopy(m), clients, mode=mode, local_steps=2, batch_size=8, lr=0.5, seed=1)
        A0 = {n: fed.model.get_submodule(n).lora_A.detach().clone() for n in fed.layers}
        ups = [fed.client_update(k) for k in range(2)]
        assert set(ups[0]) == {f"{n}.{f}" for n in fed.layers for f in fed.trained}
        assert all(not ups[0][k].equal(ups[1][k]) for k in ups[0])  # the clients differ
        fed.aggregate(ups)
        for n in fed.layers:
            layer = fed.model.get_submodule(n)
            Bbar = (10 * ups[0][f"{n}.lora_B"] + 30 * ups[1][f"{n}.lora_B"]) / 40
            if mode == "fedsvd":
                torch.testing.assert_close(layer.lora_B @ layer.lora_A, Bbar @ A0[n], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.eye(2), rtol=0, atol=1e-5)
            elif mode == "ffa":
                assert layer.lora_A.equal(A0[n])
                torch.testing.assert_close(layer.lora_B, Bbar)
            else:
                Abar = (10 * ups[0][f"{n}.lora_A"] + 30 * ups[1][f"{n}.lora_A"]) / 40
                torch.testing.assert_close(layer.lora_A, Abar)
                torch.testing.assert_close(layer.lora_B, Bbar)
        assert not any(p.requires_grad for p in fed.model.parameters())


def test_driver_is_reproducible_and_dp_runs():
    m = _model()
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    clients = [(x[:15], y[:15]), (x[15:], y[15:])]
    runs = [FedSVD(copy.deepcopy(m), clients, local_steps=2, batch_size=4, clip=0.5, noise_multiplier=0.3,
                   seed=5).fit(2).global_state() for _ in range(2)]
    for k in runs[0]:
        assert runs[0][k].equal(runs[1][k])
    other = FedSVD(copy.deepcopy(m), clients, local_steps=2, batch_size=4, clip=0.5, noise_multiplier=0.3,
                   seed=6).fit(2).global_state()
    assert any(not runs[0][k].equal(other[k]) for k in other)


def test_federated_training_learns_in_every_mode():
    task = fed_task(clients=4, n_train=600, n_test=400, dim=12, hidden=16, classes=4, rank=2)
    base = float((task.model(task.x_test).argmax(-1) == task.y_test).float().mean())
    acc = {mode: run_mode(task, mode, 10, local_steps=4) for mode in ("fedsvd", "lora", "ffa")}
    assert all(a > base + 0.05 for a in acc.values()), (acc, base)
    # re-orienting A each round (FedSVD) beats keeping the random A (FFA-LoRA) here
    assert acc["fedsvd"] > acc["ffa"], acc


def test_dirichlet_split_is_a_skewed_partition():
    y = torch.arange(8).repeat_interleave(50)
    parts = dirichlet_split(y, 5, alpha=0.2, seed=0)
    allidx = torch.cat(parts).sort().values
    assert allidx.equal(torch.arange(400))
    hist = torch.stack([torch.bincount(y[p], minlength=8) for p in parts]).float()
    share = hist.max(1).values / hist.sum(1).clamp_min(1)
    assert share.mean() > 0.3  # label skew: IID would give 1/8 per class
    assert dirichlet_split(y, 5, alpha=0.2, seed=0)[2].equal(parts[2])
    assert_raises_naming(lambda: dirichlet_split(y, 0), ValueError, ["clients", ">= 1", "0"])
    assert_raises_naming(lambda: dirichlet_split(y, 2, alpha=0.0), ValueError, ["alpha", "0.0"])


def test_driver_errors():
    m = _model()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    ok = [(x, y)]
    assert_raises_naming(lambda: FedSVD(m, ok, mode="avg"), ValueError, ["mode", "fedsvd", "'avg'"])
    assert_raises_naming(lambda: FedSVD(m, ok, noise_multiplier=1.0), ValueError, ["noise_multiplier", "clip"])
    assert_raises_naming(lambda: FedSVD(m, [(x, y), (torch.randn(4, 7), y[:4])]), ValueError,
                         ["clients[1]", "[6]", "[7]"])
    assert_raises_naming(lambda: FedSVD(m, [(x, y[:3])]), ValueError, ["clients[0]", "[10, 6]", "[3]"])
    assert_raises_naming(lambda: FedSVD(m, []), ValueError, ["clients", "non-empty"])
    assert_raises_naming(lambda: FedSVD(nn.Linear(3, 3), ok), ValueError, ["model", "SVDLinear"])
    assert_raises_naming(lambda: FedSVD(m, ok, lr=0.0), ValueError, ["lr", "> 0"])
    assert_raises_naming(lambda: FedSVD(m, ok, local_steps=0), ValueError, ["local_steps", ">= 1"])
    pissa = adapt(nn.Linear(6, 6), "svfit", rank=2)
    assert_raises_naming(lambda: FedSVD(pissa, ok), ValueError, ["model", "'svfit'"])
    fed = FedSVD(m, ok)
    assert_raises_naming(lambda: fed.aggregate([]), ValueError, ["updates", "1", "0"])
    assert_raises_naming(lambda: fed.fit(-1), ValueError, ["rounds", ">= 0"])
