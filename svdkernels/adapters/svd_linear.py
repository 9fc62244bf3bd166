"""``SVDLinear``: one adapter layer for the whole SVD adapter family.

Every method of :func:`svdkernels.adapt` is a frozen base weight plus a low-rank
branch in factored form::

    y = x·Wᵀ + bias + scaling · ((x·Aᵀ) ⊙ e)·Nᵀ·Bᵀ        (ΔW = scaling · B·N·diag(e)·A)

with ``A [r, in]``, ``B [out, r]``, an optional spectrum vector ``e [r]`` and an
optional core matrix ``N [r, r]``. The methods differ only in how these are
initialised, which of them train, and what regulariser they carry
(``svdkernels/adapters/methods.py``). The forward pass never rebuilds the dense
weight: two (or three) thin products per call, the way the research code of
SORSA, SALT, Effort and CLIP-SVD does *not* (they form ``U·diag(σ)·Vᵀ`` each step).

``W`` is the frozen *base*: for residual methods (PiSSA, SVFit, ...) it is
``W₀ − removed_up·removed_down``, where the removed low-rank part is kept as two
small buffers so that :func:`svdkernels.adapters.load_adapter` can rebuild the
residual from the original weight bit for bit, and peft export can express the
adapter against the original weight. CLIP-SVD moves the whole weight into the
branch (``weight is None``).

SALT (Li et al. 2025) adds a second branch in the coordinates of the remaining
singular vectors: ``U_rest·X·Y·V_restᵀ`` with trainable ``X [k−r, q]``, ``Y [q, k−r]``;
its spectrum is ``relu(a⊙σ + b)`` (trainable ``a``, ``b``, frozen ``σ``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from svdkernels.errors import check_finite_number, strict_kwargs


def _frozen(t: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
    return None if t is None else nn.Parameter(t, requires_grad=False)


SALT_PARTS = ("sigma", "salt_scale", "salt_shift", "salt_U", "salt_Vh", "salt_X", "salt_Y")
"""SALT's extra tensors (``SVDLinear.from_parts(salt=...)`` keys)."""


def _check_parts(method: object, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], A: object, B: object,
                 scaling: object, E: Optional[torch.Tensor], N: Optional[torch.Tensor], trainable: object,
                 removed: object, salt: object, config: object) -> None:
    """``TypeError``/``ValueError`` naming the first argument of
    :meth:`SVDLinear.from_parts` that is malformed (shapes, dtypes, devices, types)."""
    from svdkernels.adapters.methods import METHODS

    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {tuple(METHODS)}, got {method!r}")
    for name, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name}: expected a 2-D floating-point tensor, got {got}")
    r, in_f = A.shape
    out_f = B.shape[0]
    if r < 1 or in_f < 1 or out_f < 1 or B.shape[1] != r:
        raise ValueError(f"A, B: expected A [r, in] and B [out, r] with r, in, out >= 1, got A {list(A.shape)}, "
                         f"B {list(B.shape)}")
    check_finite_number("scaling", scaling, low=0.0, low_inclusive=False)
    shapes = {"weight": (weight, (out_f, in_f)), "bias": (bias, (out_f,)), "E": (E, (r,)), "N": (N, (r, r))}
    if removed is not None:
        if not isinstance(removed, (tuple, list)) or len(removed) != 2:
            raise TypeError(f"removed: expected None or a pair (up, down), got {type(removed).__name__}")
        p = removed[0].shape[-1] if isinstance(removed[0], torch.Tensor) and removed[0].dim() == 2 else -1
        shapes["removed[0]"], shapes["removed[1]"] = (removed[0], (out_f, p)), (removed[1], (p, in_f))
    if salt is not None:
        if not isinstance(salt, dict) or set(salt) != set(SALT_PARTS):
            raise ValueError(f"salt: expected a dict with keys {list(SALT_PARTS)}, got "
                             f"{sorted(salt) if isinstance(salt, dict) else type(salt).__name__}")
        k = min(in_f, out_f)
        X = salt["salt_X"]
        q = X.shape[-1] if isinstance(X, torch.Tensor) and X.dim() == 2 else -1
        for key, shape in (("sigma", (r,)), ("salt_scale", (r,)), ("salt_shift", (r,)), ("salt_U", (out_f, k - r)),
                           ("salt_Vh", (k - r, in_f)), ("salt_X", (k - r, q)), ("salt_Y", (q, k - r))):
            shapes[f"salt[{key!r}]"] = (salt[key], shape)
    for name, (t, shape) in shapes.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name}: expected None or a floating-point tensor, got {got}")
        if tuple(t.shape) != shape or -1 in shape:
            raise ValueError(f"{name}: expected shape {list(shape)} (A is {list(A.shape)}, B {list(B.shape)}), "
                             f"got {list(t.shape)}")
        if t.device != A.device:
            raise ValueError(f"{name}: expected device {A.device} (that of A), got {t.device}")
    if isinstance(trainable, str) or not isinstance(trainable, (tuple, list)) or not all(
            isinstance(n, str) for n in trainable):
        raise TypeError(f"trainable: expected a tuple of parameter names, got {trainable!r}")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config: expected None or a dict, got {type(config).__name__}")


class SVDLinear(nn.Module):
    """A frozen base ``nn.Linear`` weight plus a factored low-rank branch.

    Built by :func:`svdkernels.adapt`; use :meth:`from_parts` to build one by hand.

    Attributes (tensors; ``None`` when the method has no such part):
        weight: ``[out, in]`` frozen base (residual) weight, or ``None``.
        bias: ``[out]`` frozen bias, or ``None``.
        lora_A: ``[r, in]`` down projection.  lora_B: ``[out, r]`` up projection.
        lora_E: ``[r]`` spectrum (singular values / gates), or ``None``.
        lora_N: ``[r, r]`` core matrix (NLoRA), or ``None``.
        salt_scale, salt_shift: ``[r]`` SALT's ``a``, ``b``; ``sigma`` ``[r]`` frozen.
        salt_U ``[out, k−r]``, salt_Vh ``[k−r, in]`` frozen; salt_X ``[k−r, q]``, salt_Y ``[q, k−r]``.
        removed_up ``[out, p]``, removed_down ``[p, in]``: frozen buffers with
            ``weight = W₀ − removed_up·removed_down`` (absent when ``weight = W₀``).
        rank_mask: ``[r]`` bool buffer (AdaLoRA's pruned triplets are False).
    Parameters that train have ``requires_grad=True``; all others are frozen.

    Shapes: ``x [..., in] -> y [..., out]``.
    """

    def __init__(self, in_features: int, out_features: int, method: str, scaling: float) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = method
        self.scaling = float(scaling)
        self.merged = False
        self._weight_was_none = False  # merge() of a CLIP-SVD layer creates the weight
        self.config: dict = {}
        self.weight: Optional[nn.Parameter] = None
        self.bias: Optional[nn.Parameter] = None
        self.lora_E: Optional[nn.Parameter] = None
        self.lora_N: Optional[nn.Parameter] = None
        self.salt_scale: Optional[nn.Parameter] = None
        self.salt_X: Optional[nn.Parameter] = None

    @classmethod
    @strict_kwargs
    def from_parts(
        cls,
        method: str,
        *,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        A: torch.Tensor,
        B: torch.Tensor,
        scaling: float = 1.0,
        E: Optional[torch.Tensor] = None,
        N: Optional[torch.Tensor] = None,
        trainable: tuple[str, ...] = ("lora_A", "lora_B"),
        removed: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        salt: Optional[dict[str, torch.Tensor]] = None,
        config: Optional[dict] = None,
    ) -> "SVDLinear":
        """A layer from its tensors.

        Args:
            method: the adapter method's name (recorded; see ``methods.METHODS``).
            weight: ``[out, in]`` base weight or ``None``; bias ``[out]`` or ``None``.
            A: ``[r, in]``; B: ``[out, r]``; E: ``[r]`` or ``None``; N: ``[r, r]`` or ``None``.
            scaling: multiplies the branch.
            trainable: names of the parameters that train (others are frozen).
            removed: ``(up [out, p], down [p, in])`` with ``weight = W₀ − up·down``.
            salt: SALT's extra tensors ``sigma, salt_scale, salt_shift, salt_U,
                salt_Vh, salt_X, salt_Y`` (see the class docstring).
            config: the method's hyper-parameters (regulariser weights), JSON-serialisable.
        """
        _check_parts(method, weight, bias, A, B, scaling, E, N, trainable, removed, salt, config)
        out_f, r = B.shape
        in_f = A.shape[1]
        layer = cls(in_f, out_f, method, scaling)
        layer.config = dict(config or {})
        layer.weight = _frozen(weight)
        layer.bias = _frozen(bias)
        layer.lora_A = nn.Parameter(A, requires_grad=False)
        layer.lora_B = nn.Parameter(B, requires_grad=False)
        layer.lora_E = _frozen(E)
        layer.lora_N = _frozen(N)
        layer.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=A.device))
        if removed is not None:
            layer.register_buffer("removed_up", removed[0])
            layer.register_buffer("removed_down", removed[1])
        if salt is not None:
            layer.register_buffer("sigma", salt["sigma"])
            for name in ("salt_scale", "salt_shift", "salt_U", "salt_Vh", "salt_X", "salt_Y"):
                setattr(layer, name, nn.Parameter(salt[name], requires_grad=False))
        for name in trainable:
            p = getattr(layer, name, None)
            if not isinstance(p, nn.Parameter):
                raise ValueError(f"trainable: {name!r} is not a parameter of a {method} layer")
            p.requires_grad_(True)
        return layer

    # -- the branch ---------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """``r``: the number of components in the branch (including masked ones)."""
        return self.lora_A.shape[0]

    def spectrum(self) -> Optional[torch.Tensor]:
        """``e [r]`` as the forward pass uses it (SALT: ``relu(a⊙σ + b)``; AdaLoRA's
        pruned entries are zero), or ``None`` for a plain ``B·A`` branch."""
        if self.salt_scale is not None:
            return torch.relu(self.salt_scale * self.sigma + self.salt_shift)
        if self.method == "adalora":
            return self.lora_E * self.rank_mask
        return self.lora_E

    def _salt_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # (U_rest·X) [out, q] and (Y·V_restᵀ) [q, in]: thin products, once per call.
        return self.salt_U @ self.salt_X, self.salt_Y @ self.salt_Vh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_A.dtype
        x = x.to(dtype)
        if self.weight is not None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = x.new_zeros(*x.shape[:-1], self.out_features)
            if self.bias is not None:
                y = y + self.bias
        if self.merged:
            return y
        h = F.linear(x, self.lora_A)  # [..., r]
        e = self.spectrum()
        if e is not None:
            h = h * e
        if self.lora_N is not None:
            h = F.linear(h, self.lora_N)
        # y += s·h·Bᵀ in place: F.linear does not keep its output for backward, and an
        # activation-sized temporary per call costs as much as the thin GEMM itself.
        y2 = y.view(-1, self.out_features)
        y2.addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.t(), alpha=self.scaling)
        if self.salt_X is not None:
            up, down = self._salt_factors()
            y2.addmm_(F.linear(x, down).reshape(-1, down.shape[0]), up.t())
        return y

    def delta_weight(self) -> torch.Tensor:
        """The dense ``ΔW [out, in]`` of the branch in float32 (merging and tests only)."""
        A = self.lora_A.float()
        e = self.spectrum()
        if e is not None:
            A = e.float()[:, None] * A
        if self.lora_N is not None:
            A = self.lora_N.float() @ A
        delta = self.scaling * (self.lora_B.float() @ A)
        if self.salt_X is not None:
            up, down = self._salt_factors()
            delta = delta + up.float() @ down.float()
        return delta

    # -- merge ----------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the branch into the base weight: the forward becomes one ``F.linear``."""
        if self.merged:
            return
        delta = self.delta_weight()
        if self.weight is None:
            self.weight = _frozen(delta.to(self.lora_A.dtype))
            self._weight_was_none = True
        else:
            self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (to the weight dtype's rounding)."""
        if not self.merged:
            return
        if self._weight_was_none:
            self.weight = None
            self._weight_was_none = False
        else:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def trainable_names(self) -> list[str]:
        """Names of this layer's parameters that train."""
        return [n for n, p in self.named_parameters(recurse=False) if p.requires_grad]

    def extra_repr(self) -> str:
        return (f"method={self.method}, in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, scaling={self.scaling:g}, trainable={self.trainable_names()}")
