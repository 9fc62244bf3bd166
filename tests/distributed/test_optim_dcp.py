"""LowRankAdamW's state through torch.distributed.checkpoint: saved by 2 FSDP2 ranks,
loaded by 1 plain process and by 4 FSDP2 ranks, the training continues identically."""
import pytest
import torch
import torch.distributed.checkpoint as dcp
from optim_dist_cases import TinyMLP, assert_weights_close, data, full_weights, make_optimizer, train
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from svdkernels.testing.distributed import run_distributed
from svdkernels.train.distributed import load_sharded_state_dict, sharded_state_dict

# Every kind of basis state: float rows, packed int4 with Q-GaLore's cosine window,
# DCT indices, a random basis's seed.
CONFIGS = [
    dict(projector="rsvd", moments="rotate"),
    dict(projector="rsvd", moments="rotate", proj_bits=4, adaptive_gap=True),
    dict(projector="dct", moments="rotate"),
    dict(projector="random", moments="reset"),
]
SAVED_AT, STEPS = 3, 8  # saved after steps 0..2 (refreshes at 0 and 2); 3..7 refresh at 4 and 6


def model_for(world: int, sharded: bool, seed: int = 0) -> TinyMLP:
    model = TinyMLP(seed=seed)
    if sharded:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model.l1, model.l2, model.l3):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def continue_from(model, opt, rank, world):
    """The weights after each step SAVED_AT..STEPS-1, the first still-due refresh included."""
    X, Y = data(STEPS)
    out = []
    for t in range(SAVED_AT, STEPS):
        train(model, opt, X, Y, range(t, t + 1), rank, world)
        out.append(full_weights(model))
    return out


def _save_on_two(rank, world, root):
    X, Y = data(STEPS)
    out = []
    for ci, config in enumerate(CONFIGS):
        model = model_for(world, True)
        opt = make_optimizer(model, config)
        train(model, opt, X, Y, range(SAVED_AT), rank, world)
        dcp.save({"model": model.state_dict(), "optim": sharded_state_dict(opt, model)},
                 checkpoint_id=f"{root}/{ci}")
        out.append(continue_from(model, opt, rank, world))
    return out


def _load(rank, world, root):
    out = []
    for ci, config in enumerate(CONFIGS):
        # One process: a plain model, no FSDP. Other initial weights than the checkpoint's.
        model = model_for(world, world > 1, seed=5)
        opt = make_optimizer(model, config)
        state = {"model": model.state_dict(), "optim": sharded_state_dict(opt, model)}
        dcp.load(state, checkpoint_id=f"{root}/{ci}")
        model.load_state_dict(state["model"])
        load_sharded_state_dict(opt, model, state["optim"])
        out.append(continue_from(model, opt, rank, world))
    return out


def test_saved_on_two_continues_on_one_and_four(tmp_path):
    saved = run_distributed(_save_on_two, 2, str(tmp_path), timeout=150)[0]
    for world in (1, 4):
        loaded = run_distributed(_load, world, str(tmp_path), timeout=150)
        for ci, config in enumerate(CONFIGS):
            for rank in range(world):
                for t, (got, want) in enumerate(zip(loaded[rank][ci], saved[ci])):
                    assert_weights_close(got, want, f"{config}: loaded on {world}, rank {rank}, step {SAVED_AT + t}")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process, on purpose
def test_plain_round_trip_and_template_checked(tmp_path):
    """In one process without a process group: resuming from the checkpoint gives the
    same weights bit for bit; a state missing an entry is refused, nothing changed."""
    X, Y = data(STEPS)
    config = CONFIGS[1]
    model = TinyMLP()
    opt = make_optimizer(model, config)
    train(model, opt, X, Y, range(SAVED_AT))
    dcp.save({"model": model.state_dict(), "optim": sharded_state_dict(opt, model)}, checkpoint_id=str(tmp_path))
    train(model, opt, X, Y, range(SAVED_AT, STEPS))
    other = TinyMLP(seed=5)
    opt2 = make_optimizer(other, config)
    state = {"model": other.state_dict(), "optim": sharded_state_dict(opt2, other)}
    dcp.load(state, checkpoint_id=str(tmp_path))
    other.load_state_dict(state["model"])
    partial = dict(state["optim"])
    del partial["l2.weight.basis_scale"]
    with pytest.raises(ValueError, match=r"state: expected entry l2.weight.basis_scale"):
        load_sharded_state_dict(opt2, other, partial)
    assert not opt2.state
    load_sharded_state_dict(opt2, other, state["optim"])
    assert opt2.state[other.l2.weight]["cosines"] and opt2.state[other.l2.weight]["refreshes"] == 2
    train(other, opt2, X, Y, range(SAVED_AT, STEPS))
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(other.named_parameters())[name]), name
