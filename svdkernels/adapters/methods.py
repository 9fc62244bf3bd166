"""Initialisation, trainable set and regulariser of each SVD adapter method.

Each ``_init_<method>`` takes the float32 weights of one *shape group*
``W [L, out, in]`` (every target layer of that shape, so each factorisation is one
batched call) and returns one :class:`Init` per layer: the tensors of an
:class:`~svdkernels.adapters.svd_linear.SVDLinear`. Parametrisations follow
``/shared/REFERENCES.md`` ("Adapters"); where a paper leaves a choice open the
method's docstring says what is chosen here and why.

Principal components come from :func:`svdkernels.rsvd` (one call per shape group,
oversampled, with power iterations: peft's ``pissa_niter_N`` calls ``svd_lowrank``
layer by layer with no oversampling). Methods that need the *minor* components or
the whole spectrum (MiLoRA, KaSA, Effort, SALT, CLIP-SVD, CorDA-KPM) use the exact
batched ``torch.linalg.svd``: a randomized sketch cannot find the tail.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from svdkernels.ops.rsvd import rsvd

Tensor = torch.Tensor


@dataclass
class Init:
    """The tensors of one adapted layer (``SVDLinear.from_parts`` arguments)."""

    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    scaling: float = 1.0
    E: Optional[Tensor] = None  # [r]
    N: Optional[Tensor] = None  # [r, r]
    removed: Optional[tuple[Tensor, Tensor]] = None  # (up [out, p], down [p, in])
    drop_weight: bool = False  # the whole weight moved into the branch (CLIP-SVD)
    salt: Optional[dict[str, Tensor]] = None
    trainable: tuple[str, ...] = ("lora_A", "lora_B")
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """What :func:`svdkernels.adapt` needs to know about a method."""

    name: str
    init: Callable[..., list[Init]]
    preserves_output: bool  # the adapted model's outputs equal the base model's at init
    needs: Optional[str] = None  # "covariance" (CorDA) or "inputs" (EVA) from calib_batches
    full_rank_ok: bool = True  # rank may equal min(out, in)
    peft_lora: bool = False  # exportable to peft's LoRA format


def _kaiming(shape: tuple[int, ...], gen: torch.Generator, fan_in: int) -> Tensor:
    # nn.init.kaiming_uniform_(a=√5), as peft's LoRA A: bound 1/√fan_in.
    return (torch.rand(*shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)


def _exact(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.linalg.svd(W, full_matrices=False)


def _split_sqrt(U: Tensor, S: Tensor, Vh: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """PiSSA's split: ``A = √(S/s)·Vh``, ``B = U·√(S/s)``, so ``s·B·A = U·S·Vh``."""
    root = (S / scaling).sqrt()
    return root[..., :, None] * Vh, U * root[..., None, :]


def _pissa_like(U: Tensor, S: Tensor, Vh: Tensor, scaling: float) -> list[Init]:
    A, B = _split_sqrt(U, S, Vh, scaling)
    return [Init(A=A[i], B=B[i], scaling=scaling, removed=(scaling * B[i], A[i])) for i in range(A.shape[0])]


def _spectral(U: Tensor, S: Tensor, Vh: Tensor, trainable: tuple[str, ...], config: dict | None = None) -> list[Init]:
    """``A = Vh``, ``B = U``, ``E = S``: the branch is the SVD itself (SVFit, SORSA, Effort)."""
    return [
        Init(A=Vh[i], B=U[i], E=S[i], removed=(U[i] * S[i], Vh[i]), trainable=trainable, config=dict(config or {}))
        for i in range(S.shape[0])
    ]


# ---------------------------------------------------------------------------
# The methods


def _init_lora(W: Tensor, rank: int, *, seed: int, alpha: float, **_: Any) -> list[Init]:
    """LoRA (Hu et al. 2021): ``A`` Kaiming-uniform, ``B = 0``, scaling ``alpha/r``; the base is untouched."""
    gen = torch.Generator().manual_seed(seed)
    L, out_f, in_f = W.shape
    return [Init(A=_kaiming((rank, in_f), gen, in_f), B=torch.zeros(out_f, rank), scaling=alpha / rank)
            for _ in range(L)]


def _init_pissa(W: Tensor, rank: int, *, seed: int, alpha: float, oversample: int = 10, n_iter: int = 2,
                **_: Any) -> list[Init]:
    """PiSSA (Meng et al. 2024): the principal ``r`` components in ``A``, ``B``; residual frozen."""
    U, S, Vh = rsvd(W, rank, oversample=oversample, n_iter=n_iter, seed=seed)
    return _pissa_like(U, S, Vh, alpha / rank)


def _init_milora(W: Tensor, rank: int, *, alpha: float, **_: Any) -> list[Init]:
    """MiLoRA (Wang et al. 2024): PiSSA's split of the *minor* ``r`` components."""
    U, S, Vh = _exact(W)
    return _pissa_like(U[..., -rank:], S[..., -rank:], Vh[..., -rank:, :], alpha / rank)


def _init_soma(W: Tensor, rank: int, *, alpha: float, **_: Any) -> list[Init]:
    """SoMA (Yun et al. 2025): MiLoRA's minor ``r`` components in ``B·A``, residual frozen.
    Its frozen blocks (``freeze_blocks``) and annealed weight decay are in
    ``svdkernels/adapters/soma.py``."""
    return _init_milora(W, rank, alpha=alpha)


def _init_svfit(W: Tensor, rank: int, *, seed: int, oversample: int = 10, n_iter: int = 2, **_: Any) -> list[Init]:
    """SVFit (Sun et al. 2024): only the top-``r`` singular values train; ``U``, ``V`` frozen.

    The paper picks ``r`` capturing > 99% of the energy; here ``rank`` is given
    (``svdkernels.select_rank(S, energy=0.99)`` computes the paper's choice).
    """
    U, S, Vh = rsvd(W, rank, oversample=oversample, n_iter=n_iter, seed=seed)
    return _spectral(U, S, Vh, ("lora_E",))


def _init_clip_svd(W: Tensor, rank: int, **_: Any) -> list[Init]:
    """CLIP-SVD (Koleilat et al. 2025): every singular value trains, ``U``, ``V`` frozen.

    The whole weight moves into the branch (``weight = None``): ``y = ((x·V)⊙σ)·Uᵀ``,
    two thin GEMMs of ``min(out, in)`` columns. ``rank`` is ignored (it is the full rank).
    """
    U, S, Vh = _exact(W)
    return [Init(A=Vh[i], B=U[i], E=S[i], drop_weight=True, trainable=("lora_E",)) for i in range(S.shape[0])]


def _init_sorsa(W: Tensor, rank: int, *, seed: int, gamma: float = 4e-4, oversample: int = 10, n_iter: int = 2,
                **_: Any) -> list[Init]:
    """SORSA (Cao 2024): ``U_p``, ``Σ_p``, ``V_p`` of the top ``r`` train; residual frozen.

    Regulariser ``γ·mean(‖AAᵀ − I‖_F, ‖BᵀB − I‖_F)``. SORSA applies it as a separate
    step of size γ independent of the learning rate; as a loss term (what
    :func:`regularization_loss` returns) it is scaled by the learning rate instead,
    so ``gamma`` defaults to the paper's 4e-4 and may need rescaling.
    """
    U, S, Vh = rsvd(W, rank, oversample=oversample, n_iter=n_iter, seed=seed)
    return _spectral(U, S, Vh, ("lora_A", "lora_E", "lora_B"), {"gamma": gamma})


def _init_effort(W: Tensor, rank: int, *, weight_orth: float = 1.0, **_: Any) -> list[Init]:
    """Effort (Yan et al. 2025): the principal ``min(out,in) − r`` components frozen,
    the ``r`` residual (minor) components ``U_r``, ``σ_r``, ``V_r`` train.

    ``rank`` counts the *trainable* components (the paper's CLIP-L setting, 1023
    frozen of 1024, is ``rank=1``). Its orthogonality term ``‖UᵀU − I‖_F + ‖VVᵀ − I‖_F``
    on the trainable vectors is the regulariser, weight ``weight_orth`` (1, as the
    paper sums its loss terms).
    """
    U, S, Vh = _exact(W)
    return _spectral(U[..., -rank:], S[..., -rank:], Vh[..., -rank:, :], ("lora_A", "lora_E", "lora_B"),
                     {"weight_orth": weight_orth})


def _init_salt(W: Tensor, rank: int, *, seed: int, salt_rank: Optional[int] = None, reg_weight: float = 1e-3,
               **_: Any) -> list[Init]:
    """SALT (Elsayed et al. 2025): the top ``r`` singular values get a scale and shift
    ``σ' = relu(a⊙σ + b)`` (``a = 1``, ``b = 0``), the remaining singular block a
    low-rank update ``X·Y`` of rank ``salt_rank`` (default ``r``) in singular-vector
    coordinates (``X`` Kaiming, ``Y = 0``), so outputs are unchanged at init.

    Regulariser ``reg_weight·(‖σ' − σ‖ + ‖X·Y‖_F)`` (the change of the top spectrum and
    the size of the update; ``‖XY‖_F`` from ``q×q`` Grams). The paper leaves the
    weight open; 1e-3 is our default.
    """
    q = rank if salt_rank is None else salt_rank
    U, S, Vh = _exact(W)
    k = S.shape[-1]
    if not 1 <= q <= k - rank:
        raise ValueError(f"salt_rank: expected 1 <= salt_rank <= min(out, in) - rank = {k - rank}, got {q}")
    gen = torch.Generator().manual_seed(seed)
    inits = []
    for i in range(S.shape[0]):
        Ur, Sr, Vr = U[i, :, :rank], S[i, :rank], Vh[i, :rank]
        salt = {"sigma": Sr.clone(), "salt_scale": torch.ones(rank), "salt_shift": torch.zeros(rank),
                "salt_U": U[i, :, rank:].contiguous(), "salt_Vh": Vh[i, rank:].contiguous(),
                "salt_X": _kaiming((k - rank, q), gen, q), "salt_Y": torch.zeros(q, k - rank)}
        inits.append(Init(A=Vr, B=Ur, removed=(Ur * Sr, Vr), salt=salt,
                          trainable=("salt_scale", "salt_shift", "salt_X", "salt_Y"),
                          config={"reg_weight": reg_weight}))
    return inits


def _init_kasa(W: Tensor, rank: int, *, seed: int, alpha: float, beta: float = 1e-4, gamma: float = 1e-3,
               **_: Any) -> list[Init]:
    """KaSA (Wang et al. 2024): the base is truncated to rank ``min(out,in) − r`` (the
    minor ``r`` components are dropped as task-irrelevant knowledge), and
    ``ΔW = B·diag(d)·A`` trains with ``β·Σd² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F)``.

    ``A`` Kaiming, ``B = 0`` (the branch starts at zero, as LoRA's), ``d = 1`` (so
    ``B``'s first gradients are LoRA's). Outputs change at init by the dropped
    components, as in the paper.
    """
    U, S, Vh = _exact(W)
    gen = torch.Generator().manual_seed(seed)
    L, out_f, in_f = W.shape
    return [
        Init(A=_kaiming((rank, in_f), gen, in_f), B=torch.zeros(out_f, rank), E=torch.ones(rank),
             scaling=alpha / rank, removed=(U[i, :, -rank:] * S[i, -rank:], Vh[i, -rank:]),
             trainable=("lora_A", "lora_E", "lora_B"), config={"beta": beta, "gamma": gamma})
        for i in range(L)
    ]


def _init_nlora(W: Tensor, rank: int, *, alpha: float, train_core_only: bool = False, **_: Any) -> list[Init]:
    """NLoRA (Guo et al. 2025): ``ΔW = B·N·A`` with the Nyström approximation of the
    weight, ``A = W[:r, :]``, ``B = W[:, :r]``, ``N = pinv(W[:r, :r])``
    (``W ≈ C·W_rr⁺·R``), residual frozen so outputs are unchanged at init.
    ``train_core_only=True`` is its IntTune variant: only ``N`` trains.

    The first ``r`` rows and columns are the landmarks (the paper's deterministic
    choice); ``pinv`` uses torch's default cut-off.
    """
    scaling = alpha / rank
    inits = []
    for i in range(W.shape[0]):
        A, B = W[i, :rank].clone(), W[i, :, :rank].clone()
        N = torch.linalg.pinv(W[i, :rank, :rank].double()).float() / scaling
        trainable = ("lora_N",) if train_core_only else ("lora_A", "lora_N", "lora_B")
        inits.append(Init(A=A, B=B, N=N, scaling=scaling, removed=(scaling * (B @ N), A), trainable=trainable))
    return inits


def _init_adalora(W: Tensor, rank: int, *, seed: int, alpha: float, orth_reg_weight: float = 0.5,
                  **_: Any) -> list[Init]:
    """AdaLoRA (Zhang et al. 2023): ``ΔW = B·diag(E)·A·alpha/r``, ``E = 0``,
    ``A``, ``B ~ N(0, 0.02)``; rank budget by :class:`~svdkernels.adapters.adalora.AdaLoRABudget`;
    orthogonal regulariser ``orth_reg_weight·(‖AAᵀ − I‖_F + ‖BᵀB − I‖_F)/2``."""
    gen = torch.Generator().manual_seed(seed)
    L, out_f, in_f = W.shape
    return [
        Init(A=torch.randn(rank, in_f, generator=gen) * 0.02, B=torch.randn(out_f, rank, generator=gen) * 0.02,
             E=torch.zeros(rank), scaling=alpha / rank, trainable=("lora_A", "lora_E", "lora_B"),
             config={"orth_reg_weight": orth_reg_weight})
        for _ in range(L)
    ]


def damped_inverse(C: Tensor, *, start: float = 0.01, tol: float = 0.05, max_doublings: int = 30) -> Tensor:
    """CorDA's damped inverse of covariances ``C [L, n, n]``: add
    ``damp·mean(diag C)·I`` from ``damp = 0.01``, doubling until ``‖C_d·C_d⁻¹ − I‖_F < 0.05``
    (per layer). Returns ``(C_d, C_d⁻¹)`` stacked as ``[2, L, n, n]``."""
    n = C.shape[-1]
    eye = torch.eye(n, dtype=C.dtype)
    mean_diag = C.diagonal(dim1=-2, dim2=-1).mean(-1)
    out_C, out_inv = torch.empty_like(C), torch.empty_like(C)
    for i in range(C.shape[0]):
        damp = start
        for _ in range(max_doublings):
            Cd = C[i] + damp * mean_diag[i] * eye
            inv = torch.linalg.inv(Cd)
            if torch.dist(Cd @ inv, eye) < tol:
                break
            damp *= 2
        out_C[i], out_inv[i] = Cd, inv
    return torch.stack([out_C, out_inv])


def _init_corda(W: Tensor, rank: int, *, alpha: float, covariance: Tensor, corda_mode: str = "ipm",
                **_: Any) -> list[Init]:
    """CorDA (Yang et al. 2024): SVD of ``W·C`` with the input covariance ``C = XᵀX/n``
    (damped, :func:`damped_inverse`), ``V = (Vh·C⁻¹)ᵀ``; ``corda_mode="ipm"``
    (instruction-previewed) keeps the top ``r`` components, ``"kpm"``
    (knowledge-preserving) the bottom ``r``; PiSSA's split ``A = √S·Vᵀ``, ``B = U·√S``
    with the residual frozen. Covariances are accumulated in float64."""
    if corda_mode not in ("ipm", "kpm"):
        raise ValueError(f"corda_mode: expected 'ipm' or 'kpm', got {corda_mode!r}")
    Cd, Cinv = damped_inverse(covariance.double())
    U, S, Vh = _exact((W.double() @ Cd))
    sl = slice(0, rank) if corda_mode == "ipm" else slice(S.shape[-1] - rank, S.shape[-1])
    Vh_r = Vh[..., sl, :] @ Cinv
    return _pissa_like(U[..., sl].float(), S[..., sl].float(), Vh_r.float(), alpha / rank)


def _init_eva(W: Tensor, rank: int, *, alpha: float, components: list[Tensor], **_: Any) -> list[Init]:
    """EVA (Paischer et al. 2024): ``A`` = the top principal directions of the
    layer's inputs (per-layer ranks redistributed by explained variance, see
    ``adapt``), ``B = 0``; scaling ``alpha/rank`` with the *initial* rank for every
    layer (peft's ``adjust_scaling_factors``)."""
    out_f = W.shape[1]
    return [Init(A=c, B=torch.zeros(out_f, c.shape[0]), scaling=alpha / rank) for c in components]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", _init_lora, True, peft_lora=True),
        Method("pissa", _init_pissa, True, peft_lora=True),
        Method("milora", _init_milora, True, peft_lora=True),
        Method("soma", _init_soma, True, peft_lora=True),
        Method("svfit", _init_svfit, True),
        Method("clip_svd", _init_clip_svd, True),
        Method("sorsa", _init_sorsa, True),
        Method("salt", _init_salt, True, full_rank_ok=False),
        Method("kasa", _init_kasa, False, full_rank_ok=False),
        Method("corda", _init_corda, True, needs="covariance", peft_lora=True),
        Method("eva", _init_eva, True, needs="inputs", peft_lora=True),
        Method("nlora", _init_nlora, True),
        Method("effort", _init_effort, True),
        Method("adalora", _init_adalora, True),
    )
}
"""Every method :func:`svdkernels.adapt` builds on :class:`SVDLinear` ("soka" uses KronLinear)."""

# ---------------------------------------------------------------------------
# Per-method keyword arguments of ``adapt``

_ADAPT_SUPPLIED = frozenset({"seed", "alpha", "covariance", "components"})
"""Keyword-only parameters of the ``_init_*`` functions that ``adapt`` passes itself."""

_AT_LEAST_ONE = frozenset({"rho", "salt_rank"})
"""Numeric options whose lower bound is 1 rather than 0 (EVA's ρ as peft requires it)."""


def method_options(method: str) -> dict[str, Any]:
    """The keyword arguments ``adapt(model, method, **kwargs)`` accepts for an SVD
    method, with their defaults: the keyword-only parameters of its ``_init_*``
    function (minus what ``adapt`` supplies), plus ``rho`` for EVA."""
    import inspect

    params = inspect.signature(METHODS[method].init).parameters
    opts = {n: p.default for n, p in params.items()
            if p.kind is p.KEYWORD_ONLY and n not in _ADAPT_SUPPLIED}
    if method == "eva":
        opts["rho"] = 2.0
    if method == "soma":
        opts["freeze_blocks"] = 0
    return opts


def check_method_options(method: str, options: dict[str, Any], defaults: dict[str, Any]) -> None:
    """``TypeError``/``ValueError`` naming the first option of ``options`` whose type
    differs from its default's (``None`` defaults take an int) or whose value is
    non-finite, negative, or (for ``rho``, ``salt_rank``) below 1."""
    from svdkernels.errors import check_finite_number

    for name, value in options.items():
        default = defaults[name]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool for method {method!r}, got {value!r}")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected a str for method {method!r}, got {value!r}")
        elif isinstance(default, int) or default is None:
            if value is None and default is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int for method {method!r}, got {value!r}")
            low = 1 if name in _AT_LEAST_ONE else 0
            if value < low:
                raise ValueError(f"{name}: expected an int >= {low} for method {method!r}, got {value!r}")
        else:  # float hyper-parameters: regulariser weights, EVA's rho
            check_finite_number(name, value, low=1.0 if name in _AT_LEAST_ONE else 0.0)


# ---------------------------------------------------------------------------
# Regularisers


def _orth(M: Tensor, rows: bool) -> Tensor:
    """``‖M·Mᵀ − I‖_F`` (rows orthonormal) or ``‖Mᵀ·M − I‖_F`` (columns), from the r×r Gram."""
    G = M @ M.T if rows else M.T @ M
    return torch.linalg.matrix_norm(G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device))


def layer_regularizer(layer: Any) -> Optional[Tensor]:
    """The regulariser of one :class:`SVDLinear` (``None`` for methods without one)."""
    c, m = layer.config, layer.method
    A, B = layer.lora_A, layer.lora_B
    if m == "sorsa":
        return c["gamma"] * 0.5 * (_orth(A, True) + _orth(B, False))
    if m == "effort":
        return c["weight_orth"] * (_orth(A, True) + _orth(B, False))
    if m == "adalora":
        return c["orth_reg_weight"] * 0.5 * (_orth(A, True) + _orth(B, False))
    if m == "kasa":
        return c["beta"] * layer.lora_E.pow(2).sum() + c["gamma"] * (_orth(B, False) + _orth(A, True))
    if m == "salt":
        shift = torch.linalg.vector_norm(layer.spectrum() - layer.sigma)
        X, Y = layer.salt_X, layer.salt_Y
        # ‖XY‖_F = √tr(XᵀX·YYᵀ) from q×q Grams; the clamp keeps the gradient finite at Y = 0 (init).
        xy = ((X.T @ X) * (Y @ Y.T)).sum().clamp_min(1e-30).sqrt()
        return c["reg_weight"] * (shift + xy)
    return None
