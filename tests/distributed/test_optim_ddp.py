"""LowRankAdamW under DDP (2 gloo ranks, process_group=): the refresh work of the shape
groups is divided among the ranks and the bases broadcast, so every matrix is
factorised exactly once; the weights equal the single-process run."""
import pytest
import torch.distributed as dist
from optim_dist_cases import CONFIGS, STEPS, TinyMLP, assert_weights_close, data, full_weights, make_optimizer, train
from torch.nn.parallel import DistributedDataParallel

from svdkernels.testing.distributed import run_distributed
from svdkernels.train import LowRankAdamW
from svdkernels.train import projectors as proj

# The factorisations a refresh may run (bases_for and the DCT scoring look them up here).
COUNTED = ("svd_bases", "rsvd_bases", "warm_subspace", "dct_indices")


class Counter:
    """Counts the matrices each projector function factorises (its batch size) while active."""

    def __init__(self):
        self.calls = {name: 0 for name in COUNTED}
        self.saved = {}

    def __enter__(self):
        for name in COUNTED:
            fn = getattr(proj, name)
            self.saved[name] = fn

            def counted(G, *args, _fn=fn, _name=name, **kwargs):
                self.calls[_name] += G.shape[0]
                return _fn(G, *args, **kwargs)

            setattr(proj, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(proj, name, fn)


def _ddp_runs(rank, world):
    X, Y = data(STEPS)
    out = []
    for config in CONFIGS:
        model = DistributedDataParallel(TinyMLP())
        opt = make_optimizer(model, config, process_group=dist.group.WORLD)
        with Counter() as counter:
            train(model, opt, X, Y, range(STEPS), rank, world)
        out.append((full_weights(model), counter.calls))
    try:  # layerwise steps would need every rank to call them in the same order: refused
        opt.step_param(model.module.l1.weight)
        refused = None
    except ValueError as exc:
        refused = str(exc)
    return out, refused


def single_run(config):
    model = TinyMLP()
    opt = make_optimizer(model, config)
    X, Y = data(STEPS)
    with Counter() as counter:
        train(model, opt, X, Y, range(STEPS))
    return full_weights(model), counter.calls


def test_ddp_divides_the_refresh_and_equals_single_process():
    world = 2
    results = run_distributed(_ddp_runs, world, timeout=150)
    runs = [r[0] for r in results]
    assert all(r[1] is not None and "step_param" in r[1] for r in results)
    for ci, config in enumerate(CONFIGS):
        want, single_calls = single_run(config)
        for rank in range(world):
            assert_weights_close(runs[rank][ci][0], want, f"DDP {config} on rank {rank}")
        per_rank = [runs[rank][ci][1] for rank in range(world)]
        total = {name: sum(c[name] for c in per_rank) for name in COUNTED}
        assert total == single_calls, f"{config}: no factorisation twice, none missing"
        if config["projector"] != "random":  # random bases are seeded: nothing to factorise
            assert sum(single_calls.values()) > 0
            assert all(sum(c.values()) > 0 for c in per_rank), f"{config}: the work is divided, {per_rank}"
        else:
            assert sum(single_calls.values()) == 0


def test_plan_owners_balances_and_agrees():
    from svdkernels.train.distributed import plan_owners

    assert plan_owners([3.0, 1.0, 1.0, 1.0], 2) == [0, 1, 1, 1]
    assert plan_owners([1.0, 1.0, 1.0], 4) == [0, 1, 2]
    assert plan_owners([], 3) == []


def test_process_group_checked():
    with pytest.raises(TypeError, match="process_group: expected None or a torch.distributed ProcessGroup, got str"):
        LowRankAdamW(TinyMLP().parameters(), process_group="world")
