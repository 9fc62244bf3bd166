"""The distributed bench family's helpers (its launches are covered by the bench smoke
run): the test matrix does not depend on the world size, the live-bytes probe counts
what a call allocates, and the communication model follows its formula."""
import math

import pytest
import torch

from svdkernels.bench.distributed import LiveBytes, comm_model, local_rows
from svdkernels.ops.rsvd_sharded import allreduce_bytes


@pytest.mark.parametrize("m", [1000, 3, 257])
def test_local_rows_do_not_depend_on_the_world_size(m):
    whole = local_rows(m, 6, 0, 1)
    assert whole.shape == (m, 6)
    for world in (2, 4, 7):
        parts = [local_rows(m, 6, r, world) for r in range(world)]
        assert [p.shape[0] for p in parts] == [len(c) for c in torch.arange(m).chunk(world)] + [0] * (
            world - len(torch.arange(m).chunk(world)))
        assert torch.equal(torch.cat(parts), whole)


def test_live_bytes_counts_peak_of_created_tensors():
    x = torch.ones(1000)
    with LiveBytes() as mem:
        x.view(10, 100).mT.add_(0)  # a view of and in place on a tensor made before: nothing new
        assert mem.peak == 0
        a = x * 2  # 4000 bytes
        b = a + 1  # 8000 live
        del a
        c = b.view(10, 100) * 3  # a view is not counted again; 8000 live at most
        del b, c
    assert mem.peak == 8000 and mem.live == 0


def test_comm_model_formula():
    payload = allreduce_bytes(1, 1024, 74, 2)
    assert payload == 4 * 74 * 74 * 8 + 3 * 1024 * 74 * 4
    c = comm_model(payload, 7, 8, alpha=1e-5, beta=1e-9)
    assert math.isclose(c["wire MiB/rank"], 2 * 7 / 8 * payload / 2**20)
    assert math.isclose(c["latency ms"], 7 * 2 * 3 * 1e-5 * 1e3)
    assert math.isclose(c["bandwidth ms"], 2 * 7 / 8 * payload * 1e-9 * 1e3)
