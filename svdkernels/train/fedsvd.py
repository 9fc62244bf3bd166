"""FedSVD: federated LoRA fine-tuning with an SVD refactorisation at the server.

FedSVD (Lee et al. 2025, "FedSVD: adaptive orthogonalization for private federated
learning with LoRA"): the clients train only ``B`` of each LoRA branch ``s·B·A``
(``A`` frozen, optionally with DP-SGD), so the average of their products is exactly
``mean(B)·A``; the server then refactorises it, ``mean(B)·A = U·S·Vᵀ``, and sends back
``A = Vᵀ`` (orthonormal rows) and ``B = U·S``. Each round's ``A`` thereby follows the
principal directions of the update instead of staying at its random start (FFA-LoRA).

The reference code takes the SVD of the dense ``out×in`` product. Here it is the thin
route, exact in exact arithmetic: ``B̄ = Q_b·R_b``, ``Aᵀ = Q_a·R_a``, the ``r×r`` SVD
``R_b·R_aᵀ = U_m·S·V_mᵀ``, then ``U = Q_b·U_m``, ``Vᵀ = V_mᵀ·Q_aᵀ``.

:class:`FedSVD` simulates ``K`` clients in one process (``mode="fedsvd"``, plain
averaging of both LoRA factors ``"lora"``, or FFA-LoRA's frozen random ``A``
``"ffa"``); :func:`fedsvd_process` runs the same rounds with each client a process of
a ``torch.distributed`` group (the server on rank 0), with the same result.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from svdkernels.adapters.svd_linear import SVDLinear
from svdkernels.errors import check_finite_number

Tensor = torch.Tensor

MODES = ("fedsvd", "lora", "ffa")


# ---------------------------------------------------------------------------
# The aggregation


def _check_factors(B_clients: Sequence[Tensor] | Tensor, A: Tensor) -> Tensor:
    """The clients' ``B`` stacked ``[K, out, r]``, checked against ``A [r, in]``."""
    if not isinstance(A, Tensor) or A.dim() != 2 or not A.is_floating_point():
        got = f"{A.dtype} {list(A.shape)}" if isinstance(A, Tensor) else type(A).__name__
        raise TypeError(f"A: expected a 2-D floating-point tensor [r, in], got {got}")
    r, n = A.shape
    if isinstance(B_clients, Tensor):
        if B_clients.dim() != 3:
            raise ValueError(f"B_clients: expected a list of [out, r] tensors or a stacked [K, out, r] tensor, "
                             f"got shape {list(B_clients.shape)}")
        Bs = list(B_clients.unbind(0))
    elif isinstance(B_clients, (list, tuple)):
        Bs = list(B_clients)
    else:
        raise TypeError(f"B_clients: expected a list of tensors or a tensor, got {type(B_clients).__name__}")
    if not Bs:
        raise ValueError("B_clients: expected at least one client, got none")
    for k, B in enumerate(Bs):
        if not isinstance(B, Tensor) or B.dim() != 2 or not B.is_floating_point():
            got = f"{B.dtype} {list(B.shape)}" if isinstance(B, Tensor) else type(B).__name__
            raise TypeError(f"B_clients[{k}]: expected a 2-D floating-point tensor [out, r], got {got}")
        if B.shape != Bs[0].shape:
            raise ValueError(f"B_clients[{k}]: expected the shape of client 0, {list(Bs[0].shape)}, "
                             f"got {list(B.shape)} (every client must train the same adapter)")
        if B.dtype != A.dtype or B.device != A.device:
            raise ValueError(f"B_clients[{k}]: expected dtype {A.dtype} on {A.device} (that of A), "
                             f"got {B.dtype} on {B.device}")
    # A NaN/inf would only surface as a LinAlgError from the QR/SVD below.
    if not bool(torch.isfinite(A).all()):
        raise ValueError("A: expected finite values, got NaN or inf")
    for k, B in enumerate(Bs):
        if not bool(torch.isfinite(B).all()):
            raise ValueError(f"B_clients[{k}]: expected finite values, got NaN or inf")
    m = Bs[0].shape[0]
    if Bs[0].shape[1] != r:
        raise ValueError(f"B_clients: expected [out, r] with r = {r} (A is {list(A.shape)}), "
                         f"got {list(Bs[0].shape)}")
    if not 1 <= r <= min(m, n):
        raise ValueError(f"A: expected rank 1 <= r <= min(out, in) = {min(m, n)}, got r = {r} "
                         f"(B [{m}, {r}], A [{r}, {n}])")
    return torch.stack(Bs)


def _mean(Bs: Tensor, weights: Optional[Sequence[float]]) -> Tensor:
    if weights is None:
        return Bs.mean(0)
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights: expected None or a list of numbers (one per client), got {type(weights).__name__}")
    if len(weights) != Bs.shape[0]:
        raise ValueError(f"weights: expected one weight per client ({Bs.shape[0]}), got {len(weights)}")
    w = [check_finite_number(f"weights[{k}]", v, low=0.0) for k, v in enumerate(weights)]
    total = sum(w)
    if total <= 0:
        raise ValueError(f"weights: expected a positive sum, got {weights!r}")
    wt = torch.tensor(w, dtype=Bs.dtype, device=Bs.device) / total
    return torch.einsum("k,kmr->mr", wt, Bs)


def _canonical_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each component so that the largest-magnitude entry of its ``Vh`` row is
    positive: the SVD's sign choice made deterministic, so two routes agree."""
    idx = Vh.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(Vh.gather(-1, idx)).squeeze(-1)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, Vh * sign[:, None]


def fedsvd_aggregate(B_clients: Sequence[Tensor] | Tensor, A: Tensor, *,
                     weights: Optional[Sequence[float]] = None) -> tuple[Tensor, Tensor]:
    """The server step of FedSVD: average the clients' ``B`` and refactorise ``B̄·A``.

    Args:
        B_clients: ``K`` tensors ``[out, r]`` (or one ``[K, out, r]``), trained against
            the same frozen ``A``.
        A: ``[r, in]``, the round's shared down projection.
        weights: optional per-client weights (e.g. sample counts); uniform by default.

    Returns:
        ``(B, A)`` with ``B = U·S [out, r]`` and ``A = Vᵀ [r, in]`` (orthonormal rows),
        ``B·A = B̄·A`` exactly up to rounding. Thin route: QR of ``B̄`` and ``Aᵀ`` and
        one ``r×r`` SVD (in float64), ``O((out + in)·r²)``, never the ``out×in`` product.
        Each component's sign makes the largest entry of its ``A`` row positive.
    """
    Bs = _check_factors(B_clients, A)
    Bbar = _mean(Bs, weights)
    Qb, Rb = torch.linalg.qr(Bbar)  # [out, r], [r, r]
    Qa, Ra = torch.linalg.qr(A.T)  # [in, r], [r, r]
    Um, S, Vmh = torch.linalg.svd(Rb.double() @ Ra.double().T)
    U = Qb @ Um.to(A.dtype)
    Vh = Vmh.to(A.dtype) @ Qa.T
    U, Vh = _canonical_signs(U, Vh)
    return U * S.to(A.dtype), Vh.contiguous()


def fedsvd_aggregate_dense(B_clients: Sequence[Tensor] | Tensor, A: Tensor, *,
                           weights: Optional[Sequence[float]] = None) -> tuple[Tensor, Tensor]:
    """What FedSVD's reference code does: the truncated SVD of the dense ``B̄·A [out, in]``.
    The comparison point for :func:`fedsvd_aggregate` (tests and bench); same output."""
    Bs = _check_factors(B_clients, A)
    r = A.shape[0]
    U, S, Vh = torch.linalg.svd(_mean(Bs, weights) @ A, full_matrices=False)
    U, Vh = _canonical_signs(U[:, :r], Vh[:r])
    return U * S[:r], Vh.contiguous()


# ---------------------------------------------------------------------------
# DP-SGD


def dp_gradients(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor, *,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], clip: float, noise_multiplier: float,
                 generator: torch.Generator) -> dict[str, Tensor]:
    """DP-SGD's gradient (Abadi et al. 2016) of ``loss_fn(model(x), y)`` for ``params``.

    Per-sample gradients by ``torch.func`` (``vmap`` of ``grad`` over the batch), each
    clipped to total L2 norm ``clip`` over all of ``params``, summed, plus Gaussian
    noise ``N(0, (noise_multiplier·clip)²)``, divided by the batch size. ``x [b, ...]``,
    ``y [b]``; returns one gradient per entry of ``params`` (same shapes).
    """
    from torch.func import functional_call, grad, vmap

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    with warnings.catch_warnings():  # vmap's per-sample loop for in-place addmm_ (SVDLinear) is expected
        warnings.filterwarnings("ignore", message="There is a performance drop")
        per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)  # {name: [b, ...]}
    b = x.shape[0]
    norms = torch.sqrt(sum(g.reshape(b, -1).pow(2).sum(1) for g in per.values()))
    factor = (clip / (norms + 1e-12)).clamp(max=1.0)  # [b]
    out = {}
    for name, g in per.items():
        summed = torch.einsum("b,b...->...", factor, g)
        if noise_multiplier > 0:
            noise = torch.randn(summed.shape, generator=generator, dtype=summed.dtype)
            summed = summed + noise_multiplier * clip * noise.to(summed.device)
        out[name] = summed / b
    return out


# ---------------------------------------------------------------------------
# The driver


def _adapter_names(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, SVDLinear)]
    if not names:
        raise ValueError("model: expected a model adapted by svdkernels.adapt(model, 'lora', ...), "
                         "found no SVDLinear layer")
    for n in names:
        m = model.get_submodule(n)
        if m.lora_E is not None or m.lora_N is not None or m.salt_X is not None or m.merged:
            raise ValueError(f"model: expected plain unmerged B·A branches (method 'lora'), layer {n!r} is "
                             f"{m.method!r}{' (merged)' if m.merged else ''}")
    return names


def _check_clients(clients: object) -> list[tuple[Tensor, Tensor]]:
    if not isinstance(clients, (list, tuple)) or not clients:
        raise ValueError(f"clients: expected a non-empty list of (x, y) pairs, got {type(clients).__name__}")
    out = []
    for k, c in enumerate(clients):
        if not isinstance(c, (list, tuple)) or len(c) != 2 or not all(isinstance(t, Tensor) for t in c):
            raise TypeError(f"clients[{k}]: expected a pair of tensors (x [n, ...], y [n]), got {type(c).__name__}")
        x, y = c
        if x.shape[0] != y.shape[0] or x.shape[0] < 1:
            raise ValueError(f"clients[{k}]: expected x and y with the same number n >= 1 of samples, "
                             f"got x {list(x.shape)}, y {list(y.shape)}")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"clients[{k}]: expected finite samples x, got NaN or inf")
        if x.shape[1:] != clients[0][0].shape[1:]:
            raise ValueError(f"clients[{k}]: expected samples of shape {list(clients[0][0].shape[1:])} "
                             f"(those of client 0), got {list(x.shape[1:])}")
        out.append((x, y))
    return out


class FedSVD:
    """Federated fine-tuning of a LoRA-adapted model on ``K`` simulated clients.

    Args:
        model: a model adapted by ``svdkernels.adapt(model, "lora", rank=r, ...)``; its
            adapter factors are the global state (the model is not changed until
            :meth:`round` ends, when it holds the new global factors).
        clients: ``[(x_k [n_k, ...], y_k [n_k]), ...]``, one pair per client (non-IID
            splits are the caller's; :func:`dirichlet_split` makes label-skewed ones).
        mode: ``"fedsvd"`` (train ``B``; server averages ``B`` and refactorises by
            :func:`fedsvd_aggregate`), ``"lora"`` (train both; average both, FedAvg of
            the factors), ``"ffa"`` (FFA-LoRA: train ``B``, ``A`` stays at its random start).
        local_steps, batch_size, lr: each client's plain SGD per round.
        clip, noise_multiplier: DP-SGD (per-sample clipping to ``clip``, Gaussian noise
            of std ``noise_multiplier·clip``); ``clip=None`` trains without it.
        loss_fn: ``loss_fn(logits, y)``, cross-entropy by default.
        seed: every client's batches and noise in round ``t`` come from a generator
            seeded by ``(seed, t, k)``, so a run is reproducible and a client computes
            the same update in any process.

    The server weights clients by sample count. ``A`` is orthonormalised before the
    first round in ``"fedsvd"`` mode (the aggregation of ``B = 0``), as the paper's
    server does with every ``A`` it sends.
    """

    def __init__(self, model: nn.Module, clients: Sequence[tuple[Tensor, Tensor]], *, mode: str = "fedsvd",
                 local_steps: int = 5, batch_size: int = 32, lr: float = 0.1, clip: Optional[float] = None,
                 noise_multiplier: float = 0.0, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        for name, v in (("local_steps", local_steps), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        self.lr = check_finite_number("lr", lr, low=0.0, low_inclusive=False)
        self.clip = check_finite_number("clip", clip, low=0.0, low_inclusive=False, allow_none=True)
        self.noise_multiplier = check_finite_number("noise_multiplier", noise_multiplier, low=0.0)
        if self.noise_multiplier > 0 and self.clip is None:
            raise ValueError(f"noise_multiplier: DP noise needs per-sample clipping; expected clip set, "
                             f"got clip=None with noise_multiplier={noise_multiplier}")
        self.model, self.mode = model, mode
        self.clients = _check_clients(clients)
        self.local_steps, self.batch_size, self.seed = local_steps, batch_size, seed
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.layers = _adapter_names(model)
        self.rounds_done = 0
        for p in model.parameters():
            p.requires_grad_(False)
        if mode == "fedsvd":  # the first A the server sends is orthonormal
            self._set_global({n: fedsvd_aggregate([self._layer(n).lora_B.detach()], self._layer(n).lora_A.detach())
                              for n in self.layers})

    def _layer(self, name: str) -> SVDLinear:
        return self.model.get_submodule(name)  # type: ignore[return-value]

    @property
    def trained(self) -> tuple[str, ...]:
        """The factors the clients train: ``("lora_B",)`` or, in ``"lora"`` mode, both."""
        return ("lora_A", "lora_B") if self.mode == "lora" else ("lora_B",)

    def global_state(self) -> dict[str, Tensor]:
        """``{"<layer>.lora_A": ..., "<layer>.lora_B": ...}``: copies of the global factors."""
        return {f"{n}.{f}": getattr(self._layer(n), f).detach().clone() for n in self.layers
                for f in ("lora_A", "lora_B")}

    @torch.no_grad()
    def _set_global(self, factors: dict[str, tuple[Tensor, Tensor]]) -> None:
        for n, (B, A) in factors.items():
            layer = self._layer(n)
            layer.lora_B.copy_(B)
            layer.lora_A.copy_(A)

    def client_update(self, k: int, round_index: Optional[int] = None) -> dict[str, Tensor]:
        """Client ``k``'s local training from the current global factors; returns its
        trained factors ``{"<layer>.lora_B": ..., ("<layer>.lora_A": ...)}``. The model
        is left unchanged."""
        t = self.rounds_done if round_index is None else round_index
        x, y = self.clients[k]
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + t) * 10_007 + k) % 2**63)
        params = {f"{n}.{f}": getattr(self._layer(n), f).detach().clone() for n in self.layers for f in self.trained}
        from torch.func import functional_call

        for _ in range(self.local_steps):
            idx = torch.randint(0, x.shape[0], (min(self.batch_size, x.shape[0]),), generator=gen)
            xb, yb = x[idx], y[idx]
            if self.clip is None:
                ps = {n: p.requires_grad_(True) for n, p in params.items()}
                loss = self.loss_fn(functional_call(self.model, ps, (xb,)), yb)
                grads = dict(zip(ps, torch.autograd.grad(loss, list(ps.values()))))
            else:
                grads = dp_gradients(self.model, params, xb, yb, loss_fn=self.loss_fn, clip=self.clip,
                                     noise_multiplier=self.noise_multiplier, generator=gen)
            params = {n: (p.detach() - self.lr * grads[n]).detach() for n, p in params.items()}
        if not all(bool(torch.isfinite(p).all()) for p in params.values()):
            # The data are finite (checked at construction): the step size made the SGD diverge.
            raise ValueError(f"lr: client {k}'s local training diverged in round {t} (NaN or inf factors); "
                             f"expected a smaller lr, got {self.lr}")
        return params

    def aggregate(self, updates: Sequence[dict[str, Tensor]]) -> None:
        """The server step on the clients' :meth:`client_update` results (in client
        order); the model then holds the new global factors."""
        if len(updates) != len(self.clients):
            raise ValueError(f"updates: expected one per client ({len(self.clients)}), got {len(updates)}")
        for k, u in enumerate(updates):
            bad = [n for n, t in u.items() if not bool(torch.isfinite(t).all())]
            if bad:  # a diverged client would poison the global factors (or fail the server's SVD)
                raise ValueError(f"updates[{k}]: expected finite factors, got NaN or inf in {bad} (client {k}'s "
                                 f"local training diverged: lr = {self.lr} too large, or its data not finite)")
        w = [float(c[0].shape[0]) for c in self.clients]
        new = {}
        for n in self.layers:
            Bs = [u[f"{n}.lora_B"] for u in updates]
            A = self._layer(n).lora_A.detach()
            if self.mode == "fedsvd":
                new[n] = fedsvd_aggregate(Bs, A, weights=w)
            elif self.mode == "ffa":
                new[n] = (_mean(torch.stack(Bs), w), A)
            else:
                new[n] = (_mean(torch.stack(Bs), w), _mean(torch.stack([u[f"{n}.lora_A"] for u in updates]), w))
        self._set_global(new)
        self.rounds_done += 1

    def round(self) -> None:
        """One round: every client trains from the global factors, the server aggregates."""
        self.aggregate([self.client_update(k) for k in range(len(self.clients))])

    def fit(self, rounds: int) -> "FedSVD":
        """``rounds`` calls of :meth:`round`; returns ``self``."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds: expected an int >= 0, got {rounds!r}")
        for _ in range(rounds):
            self.round()
        return self

    @torch.no_grad()
    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Top-1 accuracy of the global model on ``(x, y)``."""
        return float((self.model(x).argmax(-1) == y).float().mean())


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(buf: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(buf[i:i + t.numel()].view_as(t).clone())
        i += t.numel()
    return out


def fedsvd_process(rank: int, world_size: int, driver: FedSVD, rounds: int) -> dict[str, Tensor]:
    """One process of a distributed FedSVD run (``torch.distributed`` initialised):
    rank 0 is the server, rank ``k + 1`` is client ``k`` (``world_size = K + 1``).

    Each round the server broadcasts the global factors, every client trains
    (:meth:`FedSVD.client_update`, the same seeded computation as the simulation) and
    the server gathers the trained factors (one ``gather`` of a flat buffer) and
    aggregates. Returns the final global state on every rank (the clients' copy is the
    last broadcast). Start it with ``svdkernels.testing.distributed.run_distributed(
    fedsvd_process, K + 1, driver, rounds)`` or under ``torchrun``.
    """
    import torch.distributed as dist

    K = len(driver.clients)
    if world_size != K + 1:
        raise ValueError(f"world_size: expected {K + 1} (a server and one process per client), got {world_size}")
    keys = [f"{n}.{f}" for n in driver.layers for f in driver.trained]
    for _ in range(rounds):
        state = driver.global_state()
        buf = _flat(list(state.values()))
        dist.broadcast(buf, src=0)
        if rank != 0:
            got = dict(zip(state, _unflat(buf, list(state.values()))))
            driver._set_global({n: (got[f"{n}.lora_B"], got[f"{n}.lora_A"]) for n in driver.layers})
        like = [state[k] for k in keys]
        mine = torch.zeros_like(_flat(like)) if rank == 0 else _flat([driver.client_update(rank - 1)[k] for k in keys])
        gathered = [torch.empty_like(mine) for _ in range(world_size)] if rank == 0 else None
        dist.gather(mine, gathered, dst=0)
        if rank == 0:
            driver.aggregate([dict(zip(keys, _unflat(g, like))) for g in gathered[1:]])
        else:
            driver.rounds_done += 1
    final = _flat(list(driver.global_state().values()))
    dist.broadcast(final, src=0)
    return dict(zip(driver.global_state(), _unflat(final, list(driver.global_state().values()))))


# ---------------------------------------------------------------------------
# Data for the comparison


def dirichlet_split(y: Tensor, clients: int, *, alpha: float = 0.5, seed: int = 0) -> list[Tensor]:
    """Label-skewed (non-IID) client indices: each class's samples are divided among
    ``clients`` by proportions drawn from ``Dirichlet(alpha)`` (smaller ``alpha``, more
    skew; Hsu et al. 2019). Returns one index tensor per client (every client gets at
    least one sample)."""
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients: expected an int >= 1, got {clients!r}")
    alpha = check_finite_number("alpha", alpha, low=0.0, low_inclusive=False)
    if y.shape[0] < clients:
        raise ValueError(f"y: expected at least one sample per client ({clients}), got {y.shape[0]}")
    import numpy as np

    rng = np.random.default_rng(seed)
    parts: list[list[Tensor]] = [[] for _ in range(clients)]
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.from_numpy(rng.permutation(idx.numel()))]
        p = rng.dirichlet([alpha] * clients)
        cuts = (np.cumsum(p) * idx.numel()).round().astype(int).tolist()
        start = 0
        for k, end in enumerate(cuts):
            parts[k].append(idx[start:end])
            start = end
    out = [torch.cat(p) if p else torch.empty(0, dtype=torch.long) for p in parts]
    for k in range(clients):  # a client with nothing borrows one sample from the largest
        if out[k].numel() == 0:
            big = max(range(clients), key=lambda j: out[j].numel())
            out[k], out[big] = out[big][:1], out[big][1:]
    return out
