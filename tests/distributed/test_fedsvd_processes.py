"""FedSVD with real clients: each client a process of a gloo group, the server on rank
0 (issue 14 item 4); the same global factors as the simulated driver for the same seeds."""
import copy

import pytest
import torch

from svdkernels.bench.train_methods_fed import fed_task
from svdkernels.testing.distributed import run_distributed
from svdkernels.testing.errors import assert_raises_naming
from svdkernels.train.fedsvd import FedSVD, fedsvd_process

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:There is a performance drop")]


def _driver(mode="fedsvd", dp=False):
    task = fed_task(clients=2, n_train=200, n_test=50, dim=8, hidden=8, classes=3, rank=2)
    kw = dict(clip=1.0, noise_multiplier=0.5) if dp else {}
    return FedSVD(task.model, task.clients, mode=mode, local_steps=2, batch_size=8, lr=0.5, seed=3, **kw)


def test_processes_equal_simulation():
    driver = _driver("fedsvd", dp=True)
    start = driver.global_state()
    results = run_distributed(fedsvd_process, 3, copy.deepcopy(driver), 2, timeout=120.0)
    simulated = driver.fit(2).global_state()
    assert any(not simulated[k].equal(start[k]) for k in start)  # the rounds changed the factors
    for rank, got in enumerate(results):
        assert set(got) == set(simulated)
        for k in simulated:
            torch.testing.assert_close(got[k], simulated[k], rtol=1e-5, atol=1e-6, msg=f"rank {rank} {k}")


def test_world_size_must_be_clients_plus_one():
    # checked before any collective, so no process group is needed to see it
    assert_raises_naming(lambda: fedsvd_process(0, 2, _driver(), 1), ValueError, ["world_size", "expected 3", "2"])
