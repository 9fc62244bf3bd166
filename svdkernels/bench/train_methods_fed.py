"""Bench family ``train_methods_fed``: FedSVD (issue 15 item 4).

- **aggregation**: the server step on an ``out×in`` rank-16 adapter of ``K`` clients:
  ours (:func:`svdkernels.train.fedsvd.fedsvd_aggregate`, QR of the factors + an
  ``r×r`` SVD) against the dense route of the reference code (truncated SVD of
  ``B̄·A``), with the difference of the two results (``err``: max |ΔB·A| relative to
  max |B·A|; ``orth``: ``‖AAᵀ − I‖_max`` of ours).
- **accuracy**: held-out accuracy after the same rounds of federated fine-tuning of a
  LoRA-adapted MLP on label-skewed (Dirichlet α = 0.3) clients of a synthetic teacher
  task (:func:`fed_task`): FedSVD, plain averaging of both LoRA factors, FFA-LoRA
  (``A`` frozen random), each without and with DP-SGD (clip 1, noise 0.5); same
  clients, seeds, learning rate and steps.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from svdkernels.adapters import adapt
from svdkernels.bench.rows import Row
from svdkernels.bench.timing import time_fn
from svdkernels.train.fedsvd import FedSVD, dirichlet_split, fedsvd_aggregate, fedsvd_aggregate_dense

@dataclass
class FedTask:
    """A federated fine-tuning problem: ``model`` (LoRA-adapted), ``clients`` and a test set."""

    model: nn.Module
    clients: list[tuple[torch.Tensor, torch.Tensor]]
    x_test: torch.Tensor
    y_test: torch.Tensor


def fed_task(*, clients: int = 8, n_train: int = 4000, n_test: int = 2000, dim: int = 32, hidden: int = 64,
             classes: int = 8, rank: int = 4, alpha: float = 0.3, seed: int = 0) -> FedTask:
    """A base MLP ``dim → hidden → classes`` (tanh) with random weights; the teacher is
    the same MLP plus a rank-``rank`` change of each weight, and labels are the
    teacher's argmax on Gaussian inputs. The base model is LoRA-adapted at ``rank``
    (all layers) and the training set split among ``clients`` by label skew."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for lin in (teacher[0], teacher[2]):
            out_f, in_f = lin.weight.shape
            U = torch.randn(out_f, rank, generator=gen)
            V = torch.randn(rank, in_f, generator=gen)
            lin.weight += 2.0 * lin.weight.norm() * (U @ V) / (U @ V).norm()
        x = torch.randn(n_train + n_test, dim, generator=gen)
        y = teacher(x).argmax(-1)
    model = adapt(copy.deepcopy(base), "lora", rank=rank, seed=seed)
    parts = dirichlet_split(y[:n_train], clients, alpha=alpha, seed=seed)
    return FedTask(model, [(x[i], y[i]) for i in parts], x[n_train:], y[n_train:])


def run_mode(task: FedTask, mode: str, rounds: int, *, clip: float | None = None, noise: float = 0.0,
             lr: float = 0.5, local_steps: int = 10, batch_size: int = 32, seed: int = 0) -> float:
    """Held-out accuracy after ``rounds`` of ``mode`` on a copy of ``task.model``."""
    fed = FedSVD(copy.deepcopy(task.model), task.clients, mode=mode, lr=lr, local_steps=local_steps,
                 batch_size=batch_size, clip=clip, noise_multiplier=noise, seed=seed)
    fed.fit(rounds)
    return fed.accuracy(task.x_test, task.y_test)


def _bench_aggregation(m: int, n: int, r: int, K: int, repeats: int) -> Iterator[Row | str]:
    name = f"aggregate {m}x{n} r{r} K{K}"
    yield name
    gen = torch.Generator().manual_seed(0)
    Bs = torch.randn(K, m, r, generator=gen)
    A = torch.linalg.qr(torch.randn(n, r, generator=gen))[0].T.contiguous()
    t_ours, (B1, A1) = time_fn(lambda: fedsvd_aggregate(Bs, A), repeats=repeats, device=torch.device("cpu"))
    # the dense m×n SVD is the slow side (minutes at 4096 on 2 cores): one timed run, warmed up
    # only when small (the first LAPACK call's set-up would otherwise dominate)
    t_ref, (B2, A2) = time_fn(lambda: fedsvd_aggregate_dense(Bs, A), repeats=1, warmup=int(m * n <= 1024 * 1024),
                              device=torch.device("cpu"))
    ref = B2 @ A2
    err = float((B1 @ A1 - ref).abs().max() / ref.abs().max())
    orth = float((A1 @ A1.T - torch.eye(r)).abs().max())
    yield Row(name, "ours thin (QR + r×r SVD)", t_ours * 1e3, kind="ours", errors={"err": 0.0, "orth": orth})
    yield Row(name, "dense SVD of B·A (reference code)", t_ref * 1e3, kind="peer", errors={"err": err},
              note=f"speed-up {t_ref / t_ours:.0f}x")


def _bench_accuracy(quick: bool) -> Iterator[Row | str]:
    # quick: 4 clients, 5 rounds of 3 local steps on batches of 16 (DP-SGD's per-sample
    # gradients are the cost: torch.func's vmap loops over the batch for SVDLinear's addmm_)
    rounds, steps, batch = (5, 3, 16) if quick else (30, 10, 32)
    task = fed_task(clients=4, n_train=600, n_test=500) if quick else fed_task()
    base = float((task.model(task.x_test).argmax(-1) == task.y_test).float().mean())
    for dp in (False, True):
        name = f"fed accuracy K{len(task.clients)} {rounds} rounds" + (" DP-SGD" if dp else "")
        yield name
        for mode, label in (("fedsvd", "ours FedSVD"), ("lora", "LoRA (average A and B)"), ("ffa", "FFA-LoRA")):
            kw = dict(clip=1.0, noise=0.5) if dp else {}
            acc = run_mode(task, mode, rounds, local_steps=steps, batch_size=batch, **kw)
            yield Row(name, label, None, kind="ours" if mode == "fedsvd" else "peer", errors={"acc": acc},
                      note=f"base {base:.3f}")


def bench_train_methods_fed(quick: bool, repeats: int) -> Iterator[Row | str]:
    """FedSVD's thin aggregation against the dense SVD; federated accuracy comparison."""
    m = 512 if quick else 4096
    yield from _bench_aggregation(m, m, 16, 8, repeats)
    yield from _bench_accuracy(quick)


def rows(quick: bool) -> list[Row]:
    """These rows as a list, for ``train_methods.EXTRA_ROW_MODULES``: they run in the
    ``train_methods`` family (``--only train_methods``), not as a family of their own."""
    return [r for r in bench_train_methods_fed(quick, 3) if isinstance(r, Row)]
