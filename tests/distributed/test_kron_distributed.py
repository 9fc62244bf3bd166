"""KronLinear under DDP and FSDP2 (2 gloo ranks): its forward is one ``linear_kron``
node on the C++ kernels (in-place sums into the frozen layer's output and input
gradient), and three SGD steps on halves of the batch give the single-process weights."""
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from svdkernels.adapters import KronLinear
from svdkernels.testing.distributed import run_distributed

STEPS = 3


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        KronLinear(nn.Linear(64, 64), init="lokr", rank=2, b_rank=2, scale=0.5),  # low-rank B: the rank path
        nn.GELU(),
        KronLinear(nn.Linear(64, 32), init="lokr", rank=1, scale=1.0),  # dense B
    )
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.A.normal_()  # LoKr starts with A = 0: a nonzero delta tests more
    return model


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 16, 64, generator=g), torch.randn(STEPS, 16, 32, generator=g)


def train(model: nn.Module, rank: int = 0, world: int = 1) -> list[str]:
    """SGD on rank's share of each batch; returns the grad_fn names of the Kron layers."""
    X, Y = data()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    seen = []
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(type(o.grad_fn).__name__))
               for m in (inner[0], inner[2])]
    for step in range(STEPS):
        x, y = X[step][rank::world], Y[step][rank::world]
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for h in handles:
        h.remove()
    return seen


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _runs(rank, world):
    ddp = DistributedDataParallel(make_model())
    seen_ddp = train(ddp, rank, world)
    fsdp = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (fsdp[0], fsdp[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    seen_fsdp = train(fsdp, rank, world)
    return ({n.removeprefix("module."): t for n, t in trained(ddp).items()}, seen_ddp,
            trained(fsdp), seen_fsdp)


def test_kron_linear_under_ddp_and_fsdp2_equals_one_process():
    single = make_model()
    seen = train(single)
    want = trained(single)
    assert set(seen) == {"_LinearKronBackward"}
    assert any(k.endswith("B_u") or k.endswith("B_v") for k in want)  # the low-rank B is trained
    for ddp, seen_ddp, fsdp, seen_fsdp in run_distributed(_runs, 2, timeout=150):
        assert set(seen_ddp) == {"_LinearKronBackward"}, seen_ddp
        for name, w in want.items():
            torch.testing.assert_close(ddp[name], w, rtol=1e-5, atol=1e-6, msg=f"DDP {name}")
            torch.testing.assert_close(fsdp[name], w, rtol=1e-5, atol=1e-6, msg=f"FSDP2 {name}")
        assert set(seen_fsdp) == {"_LinearKronBackward"}, seen_fsdp  # FSDP2's unsharded params are plain
