"""Fine-tune the small Llama with FSDP2 + ``LowRankAdamW`` (GaLore on a sharded model).

Every decoder layer and the root are wrapped by ``torch.distributed.fsdp.fully_shard``:
parameters and gradients are DTensors sharded by rows over the ranks. The attention
and MLP projections are trained in a rank-``r`` projection (Zhao et al. 2024, GaLore):
each row-sharded gradient is projected on its columns, so the optimiser step is local;
only the basis refresh every ``--update-gap`` steps communicates (the sharded rsvd:
one ``l×l`` all-reduce per orthonormalisation). Adam's moments are sharded like the
weights. ``--checkpoint DIR`` saves model and optimiser with
``torch.distributed.checkpoint`` at the end (reloadable on any number of ranks).

Run (CPU, gloo; the corpus is the stdlib docstrings, the tokenizer the built-in MiniLM's):

    torchrun --standalone --nproc-per-node 2 examples/fsdp_llama.py --steps 20

On a GPU node (nccl, one process per GPU):

    torchrun --standalone --nproc-per-node 8 examples/fsdp_llama.py --device cuda --steps 200 \\
        --hidden 256 --intermediate 688 --layers 4 --batch 64
"""
from __future__ import annotations

import argparse
import os
import resource
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from svdkernels.testing import llama
from svdkernels.train import LowRankAdamW, lowrank_param_groups
from svdkernels.train.distributed import sharded_state_dict


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="global batch (blocks), split over the ranks")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=344)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=32, help="GaLore rank")
    p.add_argument("--update-gap", type=int, default=10)
    p.add_argument("--projector", choices=("rsvd", "svd", "dct", "random"), default="rsvd")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--checkpoint", default=None, help="directory for a torch.distributed.checkpoint at the end")
    return p.parse_args(argv)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA's allocator peak, or the CPU's max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train in an initialised process group; returns this rank's losses (the global
    batch's mean, the same on every rank), step times and memory."""
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if args.batch % world:
        raise ValueError(f"--batch: expected a multiple of the world size {world}, got {args.batch}")
    mesh = init_device_mesh(device.type, (world,))
    model = llama.small_llama(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                              heads=args.heads, seed=0).to(device)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The optimiser is built on the sharded parameters (fully_shard replaces them).
    groups = lowrank_param_groups(model, targets=llama.LLAMA_TARGETS, rank=args.rank,
                                  update_gap=args.update_gap, projector=args.projector)
    opt = LowRankAdamW(groups, lr=args.lr)
    blocks = llama.token_blocks("train", args.seq_len, max_blocks=args.batch * args.steps)
    per = args.batch // world
    losses, times = [], []
    for step in range(args.steps):
        i = (step * args.batch) % max(blocks.shape[0] - args.batch + 1, 1)
        batch = blocks[i + rank * per: i + (rank + 1) * per].to(device)
        t0 = time.perf_counter()
        loss = llama.lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
        if rank == 0:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  {times[-1] * 1e3:.0f} ms", flush=True)
    if args.checkpoint:
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": model.state_dict(), "optim": sharded_state_dict(opt, model)},
                 checkpoint_id=args.checkpoint)
    lowrank = [p for g in opt.param_groups if g["lowrank"] for p in g["params"]]
    return {"losses": losses, "times": times, "state_bytes": opt.state_bytes(),
            "peak_memory": peak_memory_bytes(device),
            "refreshes": [opt.state[p].get("refreshes", 0) for p in lowrank]}


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("run me with torchrun, e.g. torchrun --standalone --nproc-per-node 2 examples/fsdp_llama.py")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        out = run(dist.get_rank(), dist.get_world_size(), args)
        if dist.get_rank() == 0:
            print(f"world {dist.get_world_size()}: optimiser state {out['state_bytes'] / 2**20:.2f} MiB per rank, "
                  f"peak memory {out['peak_memory'] / 2**20:.0f} MiB (rank 0)")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
