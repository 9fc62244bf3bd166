"""pytest-benchmark version of the ``optim`` bench family (``svdkernels/bench/optim.py``).

Same workloads: the projector refresh of a Llama-7B block at quarter width (rank 128;
ours batched cold / warm / DCT, galore-torch's per-matrix SVD), with the captured
energy over the exact SVD's in ``extra_info``; and one training step (forward, backward,
optimiser) of the small Llama per optimiser. Not collected by the test suite; run::

    python -m pytest bench/bench_optim.py              # full workloads
    python -m pytest bench/bench_optim.py -k quick     # the --quick workloads only
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch

from svdkernels.bench import optim as family
from svdkernels.train import projectors as proj

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REFRESH = {"ours-cold": None, "ours-warm": None, "ours-dct": family.dct_refresh, "galore": family.galore_refresh}


@functools.cache
def grads(quick: bool):
    return {k: G.to(DEVICE) for k, G in family.gradients(family.block_shapes(quick)).items()}


@pytest.mark.parametrize("method", list(REFRESH))
@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_refresh(benchmark, quick: bool, method: str) -> None:
    if method == "galore":
        pytest.importorskip("galore_torch")
    Gs = grads(quick)
    rank = 16 if quick else 128
    if method == "ours-cold":
        fn = lambda: family.ours_refresh(Gs, rank)  # noqa: E731
    elif method == "ours-warm":
        previous = family.ours_refresh(Gs, rank)
        fn = lambda: family.ours_refresh(Gs, rank, previous=previous)  # noqa: E731
    else:
        fn = lambda: REFRESH[method](Gs, rank)  # noqa: E731
    bases = benchmark.pedantic(fn, rounds=1 if method == "galore" else 3, iterations=1)
    worst = 1.0
    for k, G in Gs.items():
        right = G.shape[1] >= G.shape[2]
        exact = proj.captured_energy(G.double(), proj.svd_bases(G, rank, right).double(), right)
        worst = min(worst, float((proj.captured_energy(G.double(), bases[k].double(), right) / exact).min()))
    benchmark.extra_info["energy/exact"] = worst


@pytest.mark.parametrize("label", list(family.optimizers(family.train_workload(True))))
@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_train_step(benchmark, quick: bool, label: str) -> None:
    from svdkernels.testing.llama import lm_loss, small_llama, token_blocks

    wl = family.train_workload(quick)
    model = small_llama(hidden=wl.hidden, intermediate=wl.intermediate, layers=wl.layers, heads=wl.heads).to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            opt = family.optimizers(wl)[label](model)
        except ImportError as e:
            pytest.skip(str(e))
    blocks = token_blocks("train", wl.seq_len, max_blocks=wl.batch).to(DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, blocks)
        loss.backward()
        opt.step()
        return loss

    step()  # the first step refreshes every basis; time the steady state
    benchmark(step)
    benchmark.extra_info["state_bytes"] = family.state_bytes(opt)
