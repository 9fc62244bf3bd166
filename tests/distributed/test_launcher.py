"""run_distributed: results in rank order; a rank that raises, dies or hangs ends the
run with an error naming it, within the timeout."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from svdkernels.testing.distributed import DistributedError, DistributedTimeout, run_distributed
from svdkernels.testing.errors import assert_raises_naming


def _sum_ranks(rank, world_size, scale):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world_size, "sum": float(t) * scale, "threads": torch.get_num_threads(),
            "tensor": torch.full((2,), float(rank))}


def _raise_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom from the test")
    return rank


def _die_on_one(rank, world_size):
    if rank == 1:
        os._exit(3)
    return rank


def _hang_in_collective(rank, world_size):
    if rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    else:
        time.sleep(600)


def _sleep(rank, world_size):
    time.sleep(600)


def test_results_in_rank_order_with_threads():
    out = run_distributed(_sum_ranks, 3, 2.0, threads=2, timeout=120)
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["world"] == 3 and o["sum"] == 6.0 and o["threads"] == 2 for o in out)
    assert torch.equal(out[2]["tensor"], torch.full((2,), 2.0))


def test_a_rank_that_raises_is_named():
    with pytest.raises(DistributedError) as info:
        run_distributed(_raise_on_one, 2, timeout=120)
    assert info.value.ranks == [1]
    assert "rank 1 of 2 raised ValueError: boom from the test" in str(info.value)


def test_a_rank_that_dies_is_named():
    t0 = time.monotonic()
    with pytest.raises(DistributedError) as info:
        run_distributed(_die_on_one, 2, timeout=120)
    assert time.monotonic() - t0 < 60
    assert info.value.ranks == [1]
    assert "rank 1 of 2 exited with code 3 without a result" in str(info.value)


def test_a_hung_collective_raises_in_its_rank_within_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(DistributedError) as info:
        run_distributed(_hang_in_collective, 2, timeout=60, collective_timeout=3)
    assert time.monotonic() - t0 < 60
    assert 0 in info.value.ranks and "rank 0 of 2 raised" in str(info.value)


def test_the_overall_timeout_names_the_unfinished_ranks():
    t0 = time.monotonic()
    with pytest.raises(DistributedTimeout) as info:
        run_distributed(_sleep, 2, timeout=6)
    assert 6 <= time.monotonic() - t0 < 20
    assert info.value.ranks == [0, 1] and "timed out after 6 s" in str(info.value)


def test_bad_arguments():
    assert_raises_naming(lambda: run_distributed(lambda r, w: r, 1), TypeError, ["fn", "module-level"])
    assert_raises_naming(lambda: run_distributed(_sleep, 0), ValueError, ["world_size", ">= 1", "0"])
    assert_raises_naming(lambda: run_distributed(_sleep, 1, threads=0), ValueError, ["threads", "0"])
    assert_raises_naming(lambda: run_distributed(_sleep, 1, timeout=-1), ValueError, ["timeout", "-1"])
