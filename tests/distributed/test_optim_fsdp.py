"""LowRankAdamW under FSDP2 (fully_shard, 2 and 4 gloo ranks): the weights after three
refreshes equal the single-process run; the state is sharded like the weights."""
import pytest
import torch
from optim_dist_cases import (
    CONFIGS,
    KEEP_CONFIG,
    STEPS,
    TinyMLP,
    assert_weights_close,
    data,
    full_weights,
    make_optimizer,
    train,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from svdkernels.testing.distributed import run_distributed
from svdkernels.train import LowRankAdamW, lowrank_param_groups


def sharded_model(world: int) -> TinyMLP:
    model = TinyMLP()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model.l1, model.l2, model.l3):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def state_split(opt) -> tuple[int, int]:
    """(bytes of the moments, bytes of everything else) this process holds."""
    moments = other = 0
    for st in opt.state.values():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                t = v.to_local() if isinstance(v, DTensor) else v
                if key.startswith("exp_avg"):
                    moments += t.numel() * t.element_size()
                else:
                    other += t.numel() * t.element_size()
    return moments, other


def configs(world: int) -> list[dict]:
    return CONFIGS + [KEEP_CONFIG] if world == 2 else CONFIGS


def _fsdp_runs(rank, world):
    X, Y = data(STEPS)
    out = []
    for config in configs(world):
        model = sharded_model(world)
        opt = make_optimizer(model, config)
        train(model, opt, X, Y, range(STEPS), rank, world)
        w = model.l2.weight
        st = opt.state[w]
        layout = {
            "moment": (type(st["exp_avg"]).__name__, tuple(st["exp_avg"].placements),
                       tuple(st["exp_avg"].shape), tuple(st["exp_avg"].to_local().shape),
                       tuple(w.to_local().shape)),
            "refreshes": st["refreshes"],
            "bytes": state_split(opt),
        }
        if "basis" in st:
            layout["basis"] = (tuple(st["basis"].placements), tuple(st["basis"].shape))
        out.append((full_weights(model), layout))
    # A non-finite entry in one rank's shard: every rank raises naming the weight (none hangs).
    model = sharded_model(world)
    opt = make_optimizer(model, CONFIGS[0])
    train(model, opt, X, Y, range(1), rank, world)
    torch.nn.functional.mse_loss(model(X[1]), Y[1]).backward()
    if rank == world - 1:
        model.l2.weight.grad.to_local()[0, 0] = float("nan")
    try:
        opt.step()
        nonfinite = None
    except ValueError as exc:
        nonfinite = str(exc)
    try:  # the left side would need an all-reduce every step: refused
        LowRankAdamW(lowrank_param_groups(sharded_model(world), rank=4, side="left"))
        refused = None
    except ValueError as exc:
        refused = str(exc)
    return out, refused, nonfinite


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_equals_single_process(world):
    runs = run_distributed(_fsdp_runs, world, timeout=150)
    for ci, config in enumerate(configs(world)):
        model = TinyMLP()
        opt = make_optimizer(model, config)
        X, Y = data(STEPS)
        train(model, opt, X, Y, range(STEPS))
        want = full_weights(model)
        single_moments, single_other = state_split(opt)
        for rank in range(world):
            got, layout = runs[rank][0][ci]
            assert_weights_close(got, want, f"{config} on rank {rank} of {world}")
            kind, placements, shape, local_shape, w_local = layout["moment"]
            assert kind == "DTensor" and placements == (Shard(0),) and shape == (30, 4)
            assert local_shape == (w_local[0], 4)  # the weight's rows, rank columns
            assert layout["refreshes"] == 4
            if "basis" in layout:
                assert layout["basis"][0] == (Replicate(),)
            # Memory: the moments are split over the ranks, the bases held whole by each.
            assert layout["bytes"][1] == single_other
        assert sum(runs[r][0][ci][1]["bytes"][0] for r in range(world)) == single_moments
    for rank in range(world):
        msg = runs[rank][1]
        assert msg is not None and "side None or 'right'" in msg and "l1.weight" in msg
        assert runs[rank][2] is not None and "'l2.weight': non-finite gradient" in runs[rank][2]
