"""adapt on an FSDP2-sharded model (every nn.Linear its own fully_shard unit): the
factors and residual equal the single-process adapt for the same seed, the outputs are
preserved, the residual stays a Shard(0) DTensor, and no rank ever holds or
communicates a full weight (probes on every op's output and every collective)."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from torch.distributed.tensor import Shard

from svdkernels.testing.distributed import run_distributed

RANK, SEED = 2, 7
# Two layers of one shape (one batched factorisation) and one whose 40 rows give
# 10-row shards on 4 ranks, fewer than the sketch width l = RANK + 10 = 12. Sizes chosen
# so every collective's payload (at most [2, 64, 12] = 1536) is below the smallest
# weight (40 x 64 = 2560): a gathered weight cannot hide among them.
SHAPES = ((64, 64), (64, 64), (64, 40))
TOL = 1e-5  # fp32 rounding (measured about 1e-7)
METHODS = ("pissa", "svfit", "sorsa")  # every method adapt supports sharded


def _model():
    torch.manual_seed(0)
    layers = []
    for i, (fan_in, fan_out) in enumerate(SHAPES):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _probe(shapes_box):
    """A dispatch mode recording every materialised (non-meta) tensor's shape (DTensors:
    their local shard)."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    t = t._local_tensor if isinstance(t, DTensor) else t
                    if t.device.type != "meta":
                        shapes_box.add(tuple(t.shape))
            return out

    return Shapes()


def _worker(rank, world_size, methods, sizes):
    return {"methods": {m: _one_method(rank, m, sizes) for m in methods}, "errors": _errors(rank)}


def _one_method(rank, method, sizes):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard
    from torch.utils._pytree import tree_leaves

    import svdkernels.adapters
    from svdkernels.adapters.adapt import adapt

    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    ref = adapt(_model(), method, rank=RANK, seed=SEED)
    ref_params = {n: t.detach().clone() for n, t in {**dict(ref.named_parameters()), **dict(ref.named_buffers())}.items()}
    with torch.no_grad():
        y_ref = ref(x)
    out = {}
    for size in sizes:
        mesh = DeviceMesh("cpu", list(range(size)))
        if rank >= size:
            continue
        model = _model()
        with torch.no_grad():
            y_base = model(x)
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        comm = []
        originals = {}
        for fname in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor"):
            originals[fname] = getattr(dist, fname)

            def wrapped(*args, _f=originals[fname], **kwargs):
                comm.append(max(t.numel() for t in tree_leaves(args) if isinstance(t, torch.Tensor)))
                return _f(*args, **kwargs)

            setattr(dist, fname, wrapped)
        import torch.distributed._functional_collectives as funcol
        gather = funcol.all_gather_tensor

        def fc_gather(t, *args, **kwargs):
            comm.append(t.numel() * size)
            return gather(t, *args, **kwargs)

        funcol.all_gather_tensor = fc_gather
        shapes = set()
        try:
            with _probe(shapes):
                model = svdkernels.adapters.adapt(model, method, rank=RANK, seed=SEED)
        finally:
            for fname, f in originals.items():
                setattr(dist, fname, f)
            funcol.all_gather_tensor = gather
        params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        placements = {n: tuple(p.placements) for n, p in params.items() if isinstance(p, DTensor)}
        full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in params.items()}
        with torch.no_grad():
            y = model(x)
        out[size] = {"trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad), "full": full, "placements": placements, "shapes": shapes, "comm": comm,
                     "y": y.detach(), "y_base": y_base, "residual_is_dtensor": isinstance(model[0].weight, DTensor)
                     and model[0].weight.placements == (Shard(0),)}
    return {"ref": ref_params, "y_ref": y_ref, "out": out,
            "ref_trainable": sorted(n for n, p in ref.named_parameters() if p.requires_grad)}


def _errors(rank):
    """Messages for a method that needs the whole spectrum, and for a layer whose weight
    an enclosing fully_shard owns (it cannot be replaced by a unit of its own)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    import svdkernels.adapters

    mesh = DeviceMesh("cpu", [0, 1, 2, 3])
    out = {}
    for case in ("milora", "enclosing"):
        model = _model()
        if case == "milora":
            for m in model:
                if isinstance(m, nn.Linear):
                    fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        try:
            svdkernels.adapters.adapt(model, "milora" if case == "milora" else "pissa", rank=RANK, seed=SEED)
            out[case] = None
        except ValueError as exc:
            out[case] = str(exc)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_worker, 4, METHODS, (2, 4), timeout=240)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [2, 4])
def test_equals_single_process_adapt(runs, size, method):
    run = runs[0]["methods"][method]
    got, ref = run["out"][size]["full"], run["ref"]
    assert run["out"][size]["trainable"] == run["ref_trainable"] and run["ref_trainable"]
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert got[name].shape == t.shape, name
        if t.dtype == torch.bool:
            assert torch.equal(got[name], t), name
        else:
            assert (got[name] - t).abs().max() <= TOL * max(1.0, float(t.abs().max())), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [2, 4])
def test_outputs_preserved_and_residual_sharded(runs, size, method):
    for r in range(size):
        o = runs[r]["methods"][method]["out"][size]
        assert (o["y"] - runs[0]["methods"][method]["y_ref"]).abs().max() <= TOL and (o["y"] - o["y_base"]).abs().max() <= 1e-4
        assert o["residual_is_dtensor"]
        assert o["placements"] and all(p == (Shard(0),) for p in o["placements"].values())


@pytest.mark.parametrize("size", [2, 4])
def test_no_full_weight_is_materialised_or_communicated(runs, size):
    weights = {(fan_out, fan_in) for fan_in, fan_out in SHAPES}
    smallest = min(a * b for a, b in weights)
    for r in range(size):
        o = runs[r]["methods"]["pissa"]["out"][size]
        assert o["comm"], "the probe saw no collective"
        assert max(o["comm"]) < smallest, (r, max(o["comm"]), smallest)
        full_shaped = [s for s in o["shapes"] if len(s) >= 2 and s[-2:] in weights]
        assert not full_shaped, (r, full_shaped)


def test_unsupported_cases_name_the_method_or_layer(runs):
    for r in range(4):
        e = runs[r]["errors"]
        assert e["milora"] and all(w in e["milora"] for w in ("method", "'milora'", "pissa", "FSDP2")), e["milora"]
        assert e["enclosing"] and all(w in e["enclosing"] for w in ("'0'", "fully_shard", "enclosing")), e["enclosing"]
