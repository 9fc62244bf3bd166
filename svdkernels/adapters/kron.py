"""``KronLinear``: an ``nn.Linear`` plus a Kronecker delta ``scale·Σ_i A_i ⊗ B_i``.

The delta runs through :func:`svdkernels.kron_linear`, so neither the forward nor
the backward pass forms the ``out×in`` Kronecker product (peft's LoKr builds it
with ``torch.kron`` on every call). Initialisations:

- ``"soka"`` (SoKA, Kronecker adapters from the KPSVD of the weight): the top
  Kronecker terms of the frozen weight, ``√σ_k·A_k`` and ``√σ_k·B_k``, become the
  trainable factors and the base weight is replaced by the frozen residual
  ``W − Σ_k σ_k·A_k ⊗ B_k``, so the layer's output is unchanged at init. The number
  of terms comes from ``rank`` or from SoKA's energy threshold / elbow criterion on
  the rearranged spectrum. Splitting ``σ_k`` evenly between the two factors is our
  choice: it balances their scales, so one learning rate suits both.
- ``"lokr"`` (peft LoKr's default): ``A = 0`` and ``B`` Kaiming-uniform, so the
  delta starts at zero.

``A`` (``B``) is stored as ``A [r, a1, a2]`` or, given ``a_rank`` (``b_rank``), in
low-rank form ``A_u [r, a1, k]·A_v [r, k, a2]`` (LoKr's ``w1_a·w1_b``, ``w2_a·w2_b``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _nn_module  # the global hook registries

from svdkernels.errors import check_finite_number, strict_kwargs
from svdkernels.linalg.kpsvd import kpsvd, kron_sum
from svdkernels.ops.kron_linear import factor_dims, kron_linear, linear_kron, normalize_factor

Shape2 = tuple[int, int]


def _dense(factor: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The dense factor ``[r, p, q]`` of a normalised ``(dense,)`` or ``(u, v)`` factor."""
    return factor[0] if len(factor) == 1 else torch.matmul(factor[0], factor[1])


def near_square_factors(dimension: int, factor: int = -1) -> Shape2:
    """``(m, n)`` with ``m·n = dimension``: the split peft's LoKr makes
    (``peft.tuners.lokr.layer.factorization``), so adapters exchanged with it have
    the same factor shapes.

    ``factor = -1``: ``m <= n``, walking up the divisors while ``m + n`` does not
    exceed ``dimension + 1`` (the near-square divisor pair). ``factor > 0`` dividing
    ``dimension``: ``(factor, dimension // factor)`` as given; otherwise the walk stops
    at divisors above ``factor``.
    """
    if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1:
        raise ValueError(f"dimension: expected a positive int, got {dimension!r}")
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    length = m + n  # fixed at the start, as peft does
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > limit:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def _split_shapes(out_features: int, in_features: int, factor: int) -> tuple[Shape2, Shape2]:
    out_l, out_k = near_square_factors(out_features, factor)
    in_m, in_n = near_square_factors(in_features, factor)
    return (out_l, in_m), (out_k, in_n)


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones) that a direct
    ``F.linear`` would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks or _nn_module._global_forward_hooks
                or _nn_module._global_forward_pre_hooks)


def _check_scale(scale: object) -> None:
    # A NaN scale would reach the base weight through SoKA's residual and merge().
    check_finite_number("scale", scale)


class KronLinear(nn.Module):
    """``y = base(x) + scale · x @ (Σ_i A_i ⊗ B_i)ᵀ`` with the base layer frozen.

    Args:
        base: the ``nn.Linear`` to adapt (``out_features = a1·b1``,
            ``in_features = a2·b2``). Its parameters are frozen; with ``init="soka"``
            its weight is replaced in place by the residual.
        a_shape, b_shape: ``(a1, a2)`` and ``(b1, b2)``; by default the near-square
            split of peft's LoKr (:func:`near_square_factors`): ``a`` takes the
            smaller factor of each dimension.
        rank: number of Kronecker terms ``r`` (for ``"soka"`` the maximum when
            ``energy``/``elbow`` are given; for ``"lokr"`` default 1, as in LoKr).
        init: ``"soka"`` or ``"lokr"`` (see the module docstring).
        energy, elbow: SoKA's rank criteria on the KPSVD spectrum.
        a_rank, b_rank: store that factor in low-rank form of this rank (``"lokr"``
            init only: the SoKA factors are singular vectors, not low-rank).
        scale: multiplies the delta (LoKr's ``alpha / r``).
        seed: seed for the randomized KPSVD / the Kaiming init.

    Shapes: ``x [..., in_features] -> y [..., out_features]``.
    """

    @strict_kwargs
    def __init__(
        self,
        base: nn.Linear,
        *,
        a_shape: Optional[Shape2] = None,
        b_shape: Optional[Shape2] = None,
        rank: Optional[int] = None,
        init: str = "soka",
        energy: Optional[float] = None,
        elbow: bool = False,
        a_rank: Optional[int] = None,
        b_rank: Optional[int] = None,
        scale: float = 1.0,
        seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if not base.weight.is_floating_point():
            raise TypeError(f"base: expected a floating-point weight, got {base.weight.dtype}")
        if min(base.in_features, base.out_features) < 1:
            raise ValueError(f"base: expected in_features and out_features >= 1, got {base.out_features}x"
                             f"{base.in_features}")
        if init not in ("soka", "lokr"):
            raise ValueError(f"init: expected 'soka' or 'lokr', got {init!r}")
        out_f, in_f = base.out_features, base.in_features
        if (a_shape is None) != (b_shape is None):
            raise ValueError("a_shape, b_shape: expected both or neither, got only one")
        if a_shape is None:
            a_shape, b_shape = _split_shapes(out_f, in_f, -1)
        (a1, a2), (b1, b2) = tuple(a_shape), tuple(b_shape)
        if a1 * b1 != out_f or a2 * b2 != in_f:
            raise ValueError(
                f"a_shape, b_shape: expected a1*b1 = out_features ({out_f}) and a2*b2 = in_features ({in_f}), "
                f"got a_shape {tuple(a_shape)}, b_shape {tuple(b_shape)}")
        if init == "soka" and (a_rank is not None or b_rank is not None):
            raise ValueError("a_rank, b_rank: low-rank factors need init='lokr'; SoKA's factors are dense")
        _check_scale(scale)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank: expected None or a positive int, got {rank!r}")
        check_finite_number("energy", energy, low=0.0, low_inclusive=False, high=1.0, allow_none=True)
        if not isinstance(elbow, bool):
            raise TypeError(f"elbow: expected a bool, got {elbow!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed: expected None or an int in [0, 2**63), got {seed!r}")
        if init == "soka" and not bool(torch.isfinite(base.weight.detach()).all()):
            raise ValueError("base: expected a finite weight (SoKA factorises it), got NaN or inf")
        self._attach(base, (a1, a2), (b1, b2), scale)
        dtype, device = base.weight.dtype, base.weight.device
        if init == "soka":
            A, B = self._soka_init(rank, energy, elbow, seed)
            self.A = nn.Parameter(A)
            self.B = nn.Parameter(B)
        else:
            rank = 1 if rank is None else rank
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"rank: expected a positive int for init='lokr', got {rank!r}")
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            self._init_factor("A", rank, a1, a2, a_rank, zero=True, gen=gen, dtype=dtype, device=device)
            self._init_factor("B", rank, b1, b2, b_rank, zero=False, gen=gen, dtype=dtype, device=device)

    # -- construction -----------------------------------------------------------------

    def _attach(self, base: nn.Linear, a_shape: Shape2, b_shape: Shape2, scale: float) -> None:
        # State shared by both constructors; the base layer is frozen.
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.a_shape, self.b_shape = a_shape, b_shape
        self.scale = float(scale)
        self.merged = False

    def _soka_init(self, rank, energy, elbow, seed) -> tuple[torch.Tensor, torch.Tensor]:
        W = self.base.weight.data
        sigma, A, B = kpsvd(W.float(), self.a_shape, self.b_shape, rank=rank, energy=energy,
                            elbow=elbow, seed=seed)
        with torch.no_grad():
            W.copy_((W.float() - self.scale * kron_sum(sigma, A, B)).to(W.dtype))
        root = sigma.sqrt()[:, None, None]
        return (A * root).to(W.dtype).contiguous(), (B * root).to(W.dtype).contiguous()

    def _init_factor(self, name, r, p, q, k, *, zero, gen, dtype, device) -> None:
        def kaiming(*shape: int) -> torch.Tensor:
            # nn.init.kaiming_uniform_(a=√5) on a [p, q] matrix: bound 1/√fan_in.
            bound = 1.0 / math.sqrt(shape[-1])
            return (torch.rand(*shape, generator=gen) * 2 - 1).mul_(bound).to(dtype=dtype, device=device)

        if k is None:
            t = torch.zeros(r, p, q, dtype=dtype, device=device) if zero else kaiming(r, p, q)
            setattr(self, name, nn.Parameter(t))
            return
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{name.lower()}_rank: expected a positive int, got {k!r}")
        u = torch.zeros(r, p, k, dtype=dtype, device=device) if zero else kaiming(r, p, k)
        setattr(self, f"{name}_u", nn.Parameter(u))
        setattr(self, f"{name}_v", nn.Parameter(kaiming(r, k, q)))

    @classmethod
    @strict_kwargs
    def from_factors(
        cls, base: nn.Linear, A: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        B: torch.Tensor | tuple[torch.Tensor, torch.Tensor], *, scale: float = 1.0,
    ) -> "KronLinear":
        """A layer holding the given factors (``[r,p,q]``/``[p,q]`` or pairs ``(u, v)``),
        e.g. LoKr's ``w1`` (or ``(w1_a, w1_b)``) and ``w2`` (or ``(w2_a, w2_b)``)."""
        Af, Bf = normalize_factor("A", A), normalize_factor("B", B)
        dims = [factor_dims(n, f) for n, f in (("A", Af), ("B", Bf))]
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        (rA, a1, a2), (rB, b1, b2) = dims
        if rA != rB:
            raise ValueError(f"A, B: expected the same number of Kronecker terms, got {rA} and {rB}")
        if a1 * b1 != base.out_features or a2 * b2 != base.in_features:
            raise ValueError(
                f"A, B: expected a1*b1 = out_features ({base.out_features}) and a2*b2 = in_features "
                f"({base.in_features}), got A {(a1, a2)}, B {(b1, b2)}")
        _check_scale(scale)
        layer._attach(base, (a1, a2), (b1, b2), scale)
        for name, f in (("A", Af), ("B", Bf)):
            if len(f) == 1:
                setattr(layer, name, nn.Parameter(f[0].detach().clone()))
            else:
                setattr(layer, f"{name}_u", nn.Parameter(f[0].detach().clone()))
                setattr(layer, f"{name}_v", nn.Parameter(f[1].detach().clone()))
        return layer

    # -- the factors --------------------------------------------------------------------

    def factor(self, name: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``"A"`` or ``"B"``: the dense parameter, or the pair ``(u, v)``."""
        if name in self._parameters:
            return self._parameters[name]
        return self._parameters[f"{name}_u"], self._parameters[f"{name}_v"]

    @property
    def num_terms(self) -> int:
        """``r``, the number of Kronecker terms."""
        f = self.factor("A")
        return (f if isinstance(f, torch.Tensor) else f[0]).shape[0]

    def delta_weight(self) -> torch.Tensor:
        """The dense ``scale·Σ_i A_i ⊗ B_i`` ``[out, in]`` (for merging and tests only)."""
        A = _dense(normalize_factor("A", self.factor("A"))).float()
        B = _dense(normalize_factor("B", self.factor("B"))).float()
        return self.scale * kron_sum(A.new_ones(A.shape[0]), A, B)

    # -- forward, merge -----------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if not self.merged and type(base) is nn.Linear and not _hooked(base):
            # One node for the layer and its delta (in-place sums on the C++ kernels).
            return linear_kron(x.to(base.weight.dtype), base.weight, base.bias, self.factor("A"), self.factor("B"),
                               scale=self.scale)
        y = base(x)
        if self.merged:
            return y
        delta = kron_linear(x.to(self.base.weight.dtype), self.factor("A"), self.factor("B"), scale=self.scale)
        # In place: F.linear does not save its output for backward, and a fresh
        # activation-sized buffer costs page faults on the CPU.
        return y.add_(delta)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the delta into the base weight (inference without the adapter's cost)."""
        if self.merged:
            return
        W = self.base.weight
        W.copy_((W.float() + self.delta_weight()).to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact to the weight dtype's rounding)."""
        if not self.merged:
            return
        W = self.base.weight
        W.copy_((W.float() - self.delta_weight()).to(W.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.base.in_features}, out_features={self.base.out_features}, "
                f"a_shape={self.a_shape}, b_shape={self.b_shape}, terms={self.num_terms}, scale={self.scale:g}")

