"""Shared pieces of the distributed optimiser tests (not a test module): a tiny MLP whose
weights cover the shard edge cases, its data, and the training loop every run uses."""
import torch
from torch import nn

from svdkernels.train import LowRankAdamW, lowrank_param_groups

BATCH = 16


class TinyMLP(nn.Module):
    """Weights [30, 12], [30, 30] and [6, 30]: with 4 ranks the last one's rows split
    2, 2, 2, 0 -- a shard with fewer rows than the rank and an empty shard."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(12, 30)
        self.l2 = nn.Linear(30, 30)
        self.l3 = nn.Linear(30, 6)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(steps, BATCH, 12, generator=gen), torch.randn(steps, BATCH, 6, generator=gen)


def make_optimizer(model: nn.Module, config: dict, **extra) -> LowRankAdamW:
    # side="right": what a row-sharded weight uses, so the single-process run is comparable.
    groups = lowrank_param_groups(model, rank=4, update_gap=2, side="right", **config)
    return LowRankAdamW(groups, lr=1e-2, weight_decay=0.01, **extra)


def train(model: nn.Module, opt: LowRankAdamW, X: torch.Tensor, Y: torch.Tensor, steps: range,
          rank: int = 0, world: int = 1) -> None:
    """Steps ``steps`` on batches ``X[t]``; each of ``world`` ranks takes its slice of rows
    (the mean of the per-rank mean losses is the full batch's, as FSDP2/DDP average)."""
    per = BATCH // world
    for t in steps:
        x, y = X[t, rank * per:(rank + 1) * per], Y[t, rank * per:(rank + 1) * per]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (DTensors gathered), by its name without wrapper prefixes."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = t.detach().clone()
    return out


CONFIGS = [
    dict(projector="rsvd", moments="rotate"),
    dict(projector="svd", moments="rotate"),
    dict(projector="dct", moments="rotate"),
    dict(projector="random", moments="reset"),
    dict(projector="rsvd", moments="rotate", proj_bits=4, adaptive_gap=True),
    dict(projector="dct", moments="keep"),
]
# GaLore's kept moments with rsvd bases: equal on FSDP2 thanks to the canonical signs of
# the rsvd bases (projectors.canonical_signs). Run on 2 ranks only, to keep the suite short.
KEEP_CONFIG = dict(projector="rsvd", moments="keep")
# moments="keep" with svd is left out on purpose: svd keeps torch.linalg.svd's signs (so
# that GaLoreAdamW reproduces galore-torch), and the sharded factorisation may return a
# basis vector of the other sign, which keeping the moments does not undo.
STEPS = 7  # refreshes at steps 0, 2, 4, 6: three after the first


def assert_weights_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{what}: {name}: {m}")
