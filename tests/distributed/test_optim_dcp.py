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
    """Returns, per config, the weights of the continued run and the l2.weight state saved."""
    X, Y = data(STEPS)
    out = []
    for ci, config in enumerate(CONFIGS):
        model = model_for(world, True)
        opt = make_optimizer(model, config)
        train(model, opt, X, Y, range(SAVED_AT), rank, world)
        dcp.save({"model": model.state_dict(), "optim": sharded_state_dict(opt, model)},
                 checkpoint_id=f"{root}/{ci}")
        st = opt.state[model.l2.weight]
        saved = (st["step"], st["refreshes"], st["next_refresh"], st.get("cosines"), st.get("basis_seed"))
        out.append((continue_from(model, opt, rank, world), saved))
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
        st = opt.state[model.l2.weight]
        loaded = (st["step"], st["refreshes"], st["next_refresh"], st.get("cosines"), st.get("basis_seed"))
        out.append((continue_from(model, opt, rank, world), loaded))
    return out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process, on purpose
def test_saved_on_two_continues_on_one_and_four(tmp_path):
    saved = run_distributed(_save_on_two, 2, str(tmp_path), timeout=150)[0]
    # On 1: this very process, a plain model and no process group at all.
    loaded = {1: [_load(0, 1, str(tmp_path))], 4: run_distributed(_load, 4, str(tmp_path), timeout=150)}
    for world, runs in loaded.items():
        for ci, config in enumerate(CONFIGS):
            for rank in range(world):
                weights, loaded_state = runs[rank][ci]
                # The plain numbers (Q-GaLore's cosine window, a random basis's seed) come back as saved.
                assert loaded_state == saved[ci][1], config
                for t, (got, want) in enumerate(zip(weights, saved[ci][0])):
                    assert_weights_close(got, want, f"{config}: loaded on {world}, rank {rank}, step {SAVED_AT + t}")
    assert saved[1][1][3] and saved[3][1][4] is not None  # the window and the seed were there to restore


def test_template_checked():
    """A state missing an entry is refused, naming it; nothing changed."""
    model = TinyMLP()
    opt = make_optimizer(model, CONFIGS[1])
    partial = sharded_state_dict(opt, model)
    del partial["l2.weight.basis_scale"]
    with pytest.raises(ValueError, match=r"state: expected entry l2.weight.basis_scale"):
        load_sharded_state_dict(opt, model, partial)
    assert not opt.state
