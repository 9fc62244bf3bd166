"""Spectral analyses of whole models, each batched over layers (and samples).

- :func:`spectra`: singular values of every linear weight, one batched call per shape;
- :func:`model_intruders`: :func:`~svdkernels.analysis.intruder_dimensions` of every
  weight of a fine-tuned model against its base, one batched call per shape;
- :func:`gradient_spectra`: per sample and per target weight, the nuclear norm,
  effective rank and top singular values of the weight's gradient (Li et al. 2025,
  "How Instruction and Reasoning Data shape Post-Training": layer-wise gradients);
- :func:`composition_scores`: Q/K/V composition between every head of layer ``i``
  and every head of layer ``j > i`` (Elhage et al. 2021, "A Mathematical Framework
  for Transformer Circuits"), and per SVD component of the writing head (Merullo
  et al. 2024, "Talking Heads").

The papers' code loops a full ``torch.linalg.svd`` per layer and per sample; here
same-shaped matrices go through one batched call, per-sample gradients come from
one forward and one backward pass per batch, and no ``d×d`` head product is formed.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from svdkernels.analysis.layouts import LinearRef, detect_layout, linear_modules, weight_of
from svdkernels.analysis.metrics import (
    IntruderResult,
    check_matrix,
    effective_rank,
    intruder_dimensions,
    singular_values,
)
from svdkernels.calibration import eval_mode, output_hooks

Progress = Optional[Callable[[int], None]]
"""A callback told how many units of work were just finished (a progress bar's ``update``)."""

# Bytes of float64 Gram matrices one batched call may hold: bounds memory on big
# models (Llama-7B has 128 4096² attention weights) while MiniLM's groups are one call each.
_GRAM_BUDGET = 1 << 30

__all__ = [
    "CompositionScores",
    "GradientSpectra",
    "causal_lm_loss",
    "composition_scores",
    "gradient_spectra",
    "model_intruders",
    "spectra",
]


def _group_by_shape(weights: Mapping[str, torch.Tensor]) -> dict[tuple, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(name)
    return groups


def _chunks(names: list[str], per_item_bytes: int) -> Iterable[list[str]]:
    step = max(1, _GRAM_BUDGET // max(per_item_bytes, 1))
    for i in range(0, len(names), step):
        yield names[i:i + step]


def _weights(model: nn.Module, modules: Optional[list[str]]) -> dict[str, torch.Tensor]:
    return {name: weight_of(m) for name, m in linear_modules(model, modules).items()}


def spectra(
    model: nn.Module,
    *,
    modules: Optional[list[str]] = None,
    k: Optional[int] = None,
    rtol: Optional[float] = None,
    progress: Progress = None,
) -> dict[str, torch.Tensor]:
    """Singular values of every linear weight of ``model``, one batched call per shape.

    Args:
        model: any ``nn.Module``; its ``nn.Linear`` (and GPT-2 ``Conv1D``) weights are
            taken as ``[out, in]``.
        modules: names of the linear modules to analyse; all by default.
        k: keep the top ``k`` values of each (all by default; capped at ``min(m, n)``).
        rtol: ``None``: exact to ~1e-6 relative down to ~1e-5·σ_1 (float64). A number
            in ``[1e-6, 1)``: every returned value within ``rtol`` relative, at
            float32 cost for the weights where a rounding bound certifies it (with
            ``k = 10``, ``rtol = 1e-3``: all 37 of all-MiniLM-L6-v2), float64 for the
            others (see :func:`~svdkernels.analysis.singular_values`).
        progress: called with the number of weights finished after each batched call.

    Returns:
        ``{module name: S [min(out, in)] (or [k]) float32, descending}``.
    """
    weights = _weights(model, modules)
    for name, w in weights.items():
        check_matrix(w, f"model ({name}.weight)")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k: expected a positive int or None, got {k!r}")
    out: dict[str, torch.Tensor] = {}
    for (shape, _, _), names in _group_by_shape(weights).items():
        p = min(shape)
        for chunk in _chunks(names, 8 * p * p):
            S = singular_values(torch.stack([weights[n] for n in chunk]), k=None if k is None else min(k, p), rtol=rtol)
            out.update(zip(chunk, S.unbind(0)))
            if progress:
                progress(len(chunk))
    return {name: out[name] for name in weights}


def model_intruders(
    base: nn.Module,
    finetuned: nn.Module,
    *,
    modules: Optional[list[str]] = None,
    k: int = 10,
    eps: float = 0.5,
    progress: Progress = None,
) -> dict[str, IntruderResult]:
    """Intruder dimensions of every linear weight of ``finetuned`` (merged) against
    the same-named weight of ``base``, one batched SVD per shape.

    Returns ``{module name: IntruderResult}`` (scalars ``count``, ``[k]`` the rest);
    ``ValueError`` naming ``finetuned`` when a module is missing or its shape differs.
    """
    wb = _weights(base, modules)
    named_ft = dict(finetuned.named_modules()) if isinstance(finetuned, nn.Module) else None
    if named_ft is None:
        raise TypeError(f"finetuned: expected a torch.nn.Module, got {type(finetuned).__name__}")
    wf = {}
    for name, w in wb.items():
        if name not in named_ft or getattr(named_ft[name], "weight", None) is None:
            raise ValueError(f"finetuned: expected a module {name!r} like the base model's, found none")
        wf[name] = weight_of(named_ft[name])
        if wf[name].shape != w.shape:
            raise ValueError(f"finetuned: expected {name}.weight of shape {tuple(w.shape)} (the base's), "
                             f"got {tuple(wf[name].shape)}")
    out: dict[str, IntruderResult] = {}
    for (shape, _, _), names in _group_by_shape(wb).items():
        for chunk in _chunks(names, 16 * shape[0] * min(shape)):
            res = intruder_dimensions(torch.stack([wb[n] for n in chunk]),
                                      torch.stack([wf[n].to(wb[n].dtype) for n in chunk]),
                                      k=min(k, min(shape)), eps=eps)
            for i, n in enumerate(chunk):
                out[n] = IntruderResult(*(t[i] for t in res))
            if progress:
                progress(len(chunk))
    return {name: out[name] for name in wb}


# ---------------------------------------------------------------------------
# Gradients


def causal_lm_loss(output: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample next-token cross-entropy, averaged over the tokens whose label is
    not ``-100`` (the response tokens, as in Li et al. 2025).

    ``output.logits`` ``[B, T, V]``; ``batch["labels"]`` ``[B, T]`` (``input_ids``
    with prompt and padding positions set to ``-100``). Returns ``[B]``.
    """
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise ValueError("batches: the default loss (causal_lm_loss) needs a 'labels' entry in every batch; "
                         "pass loss_fn= for other models")
    logits = output.logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
    valid = labels != -100
    return (nll * valid).sum(-1) / valid.sum(-1).clamp_min(1)


@dataclass
class GradientSpectra:
    """Per target weight (``names``, ``n`` of them) and per sample (``s``):
    ``nuclear_norm`` ``[n, s]``, ``effective_rank`` ``[n, s]`` (Roy–Vetterli on all
    singular values), ``top`` ``[n, s, k]`` the largest singular values, float32."""

    names: list[str]
    nuclear_norm: torch.Tensor
    effective_rank: torch.Tensor
    top: torch.Tensor


def _targets(model: nn.Module, modules: Optional[list[str]], layout: Optional[str]) -> dict[str, LinearRef]:
    if modules is not None:
        return {n: LinearRef(n, None, type(m).__name__ == "Conv1D") for n, m in linear_modules(model, modules).items()}
    out = {}
    for layer in detect_layout(model, layout).layers(model):
        for role, ref in layer.refs.items():
            out[f"layers.{layer.index}.{role}"] = ref
    return out


def _run(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _per_sample_spectra(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Singular values ``[B, min(out, in)]`` of each ``G_b = g_bᵀ x_b`` (``x [B, T, in]``,
    ``g [B, T, out]``), in float64.

    ``G_b`` has rank at most ``T``: with ``gᵀ = Q_g R_g`` and ``xᵀ = Q_x R_x`` (thin QR),
    ``G_b = Q_g (R_g R_xᵀ) Q_xᵀ``, so its singular values are those of the ``T×T`` core.
    """
    x, g = x.double(), g.double()
    B, T, n_in = x.shape
    n_out = g.shape[-1]
    p = min(n_in, n_out)
    if T >= p:
        return singular_values(g.mT @ x).double()
    Rg = torch.linalg.qr(g.mT, mode="r")[1]  # [B, T, T]
    Rx = torch.linalg.qr(x.mT, mode="r")[1]
    S = torch.linalg.svdvals(Rg @ Rx.mT)  # [B, T]
    return torch.nn.functional.pad(S, (0, p - T))


def gradient_spectra(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    modules: Optional[list[str]] = None,
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    k: int = 8,
    layout: Optional[str] = None,
    progress: Progress = None,
) -> GradientSpectra:
    """Spectra of per-sample gradients of target weights (Li et al. 2025).

    For every sample and target weight ``W`` (``[out, in]``): the singular values
    of ``∂loss_sample/∂W``; reported as its nuclear norm ``Σσ``, effective rank
    ``exp(−Σ p log p)``, ``p = σ/Σσ``, and the top ``k`` values.

    Per-sample gradients of a linear layer come from one forward and one backward
    pass per batch: with the layer's inputs ``x_b`` ``[T, in]`` and the gradients of
    its outputs ``g_b`` ``[T, out]``, ``∂loss_b/∂W = g_bᵀ x_b`` (the samples of a
    batch must be independent: eval mode, padding masked). Its singular values come
    from a ``T×T`` core (``T`` tokens) when ``T < min(out, in)``, all samples and
    same-shaped targets in one batched call.

    Args:
        model: the model; run in eval mode (dropout off), its weights unchanged and
            no ``.grad`` written.
        batches: iterable of batches (a ``Mapping`` is passed as keyword arguments,
            a tuple/list positionally, anything else as the one argument); each holds
            ``B`` samples along dim 0.
        modules: names of the target linear modules; by default the q, k, v and o
            projections of every layer of a BERT/Llama/GPT-2 layout (named
            ``layers.{i}.{q,k,v,o}``; GPT-2's fused ``c_attn`` split in three).
        loss_fn: ``loss_fn(output, batch) -> [B]`` per-sample losses; default
            :func:`causal_lm_loss` (needs ``labels`` in each batch).
        k: number of top singular values kept per gradient.
        layout: force a layout (``"bert"``, ``"llama"``, ``"gpt2"``) instead of detecting it.
        progress: called with 1 after each batch.

    Returns:
        :class:`GradientSpectra` over all samples of all batches, in order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if not isinstance(batches, Iterable) or isinstance(batches, (torch.Tensor, str, Mapping)):
        raise TypeError(f"batches: expected an iterable of batches (e.g. a list), got {type(batches).__name__}")
    loss_fn = loss_fn or causal_lm_loss
    targets = _targets(model, modules, layout)
    named = dict(model.named_modules())
    mods = {ref.module: named[ref.module] for ref in targets.values()}
    for name, mod in mods.items():
        check_matrix(mod.weight.detach(), f"model ({name}.weight)")

    nuc: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    erank: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    top: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    n_batches = 0
    flags = {name: m.weight.requires_grad for name, m in mods.items()}
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if name in outputs:  # g_bᵀ x_b would miss the other calls' share of the gradient
            raise ValueError(f"modules: {name!r} ran twice in one forward; per-sample gradients need one call")
        inputs[name] = x.detach()
        outputs[name] = y

    try:
        # Gradients must reach the targets' outputs; torch.autograd.grad below asks
        # for exactly those, so no parameter's .grad is written.
        for m in mods.values():
            m.weight.requires_grad_(True)
        with eval_mode(model), torch.enable_grad(), output_hooks(mods, record):
            for batch in batches:
                inputs.clear()
                outputs.clear()
                output = _run(model, batch)
                losses = loss_fn(output, batch)
                if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
                    raise ValueError(f"loss_fn: expected per-sample losses of shape [B], got "
                                     f"{getattr(losses, 'shape', type(losses).__name__)}")
                missing = [n for n in mods if n not in outputs]
                if missing:
                    raise ValueError(f"modules: {missing} did not run in the model's forward")
                order = list(outputs)
                grads = torch.autograd.grad(losses.sum(), [outputs[n] for n in order], allow_unused=True)
                gmap = {n: (torch.zeros_like(outputs[n]) if g is None else g.detach()) for n, g in zip(order, grads)}
                outputs.clear()  # frees the batch's graph before the SVDs
                del output, losses
                _batch_spectra(targets, inputs, gmap, k, nuc, erank, top)
                n_batches += 1
                if progress:
                    progress(1)
    finally:
        for name, m in mods.items():
            m.weight.requires_grad_(flags[name])
    if n_batches == 0:
        raise ValueError("batches: expected at least one batch, got an empty iterable")
    names = list(targets)
    return GradientSpectra(
        names,
        torch.stack([torch.cat(nuc[n]) for n in names]),
        torch.stack([torch.cat(erank[n]) for n in names]),
        torch.stack([torch.cat(top[n]) for n in names]),
    )


def _batch_spectra(
    targets: dict[str, LinearRef],
    inputs: dict[str, torch.Tensor],
    gmap: dict[str, torch.Tensor],
    k: int,
    nuc: dict[str, list[torch.Tensor]],
    erank: dict[str, list[torch.Tensor]],
    top: dict[str, list[torch.Tensor]],
) -> None:
    """Append one batch's per-sample nuclear norms, effective ranks and top-``k`` values
    to ``nuc``/``erank``/``top`` (per target name)."""
    # Same-shaped targets (all q/k/v/o of a layer stack, say) share one batched call.
    groups: dict[tuple, list[str]] = {}
    xs, gs = {}, {}
    for name, ref in targets.items():
        x, g = inputs[ref.module], gmap[ref.module]
        if x.dim() == 2:  # a [B, in] input: every row is a sample of one token
            x, g = x.unsqueeze(1), g.unsqueeze(1)
        x, g = x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
        if ref.rows is not None:
            g = g[..., ref.rows[0]:ref.rows[1]]
        xs[name], gs[name] = x, g
        groups.setdefault((tuple(x.shape), tuple(g.shape)), []).append(name)
    for names in groups.values():
        S = _per_sample_spectra(torch.cat([xs[n] for n in names]), torch.cat([gs[n] for n in names]))
        B = xs[names[0]].shape[0]
        nn_all = S.sum(-1).float()
        er_all = effective_rank(S)
        kk = min(k, S.shape[-1])
        tp = torch.nn.functional.pad(S[:, :kk].float(), (0, k - kk))
        for i, n in enumerate(names):
            nuc[n].append(nn_all[i * B:(i + 1) * B])
            erank[n].append(er_all[i * B:(i + 1) * B])
            top[n].append(tp[i * B:(i + 1) * B])


# ---------------------------------------------------------------------------
# Head composition


@dataclass
class CompositionScores:
    """Elhage-style composition scores between attention heads.

    ``scores`` ``[L, H, L, H]``: entry ``[i, a, j, b]`` is the score of writing head
    ``a`` of layer ``i`` composed into reading head ``b`` of layer ``j``; NaN where
    ``j <= i`` (a head reads only what earlier layers wrote). ``components``
    ``[L, H, dh, L, H]`` (with ``per_component``): the same per SVD component ``c``
    of the writer's ``W_OV`` (``writer_singular_values`` ``[L, H, dh]``, descending),
    ``‖W_read·u_c‖ / ‖W_read‖_F``; the score is their ``σ_c²``-weighted RMS.
    """

    kind: str
    scores: torch.Tensor
    writer_singular_values: torch.Tensor
    components: Optional[torch.Tensor] = None


def _head_factors(model: nn.Module, layout: Optional[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per layer and (query) head: ``Q``, ``K``, ``V`` ``[L, H, dh, d]`` and ``O``
    ``[L, H, d, dh]`` (grouped K/V heads repeated for the query heads that share them)."""
    named = dict(model.named_modules())
    layers = detect_layout(model, layout).layers(model)
    per_role: dict[str, list[torch.Tensor]] = {r: [] for r in "qkvo"}
    for layer in layers:
        H, Hkv, dh = layer.n_heads, layer.n_kv_heads, layer.head_dim
        w = {r: weight_of(named[ref.module], ref).to(dtype) for r, ref in layer.refs.items()}
        for r, t in w.items():
            check_matrix(t, f"model ({layer.refs[r].module}.weight)")
        d = w["q"].shape[1]
        per_role["q"].append(w["q"].reshape(H, dh, d))
        for r in "kv":
            per_role[r].append(w[r].reshape(Hkv, dh, d).repeat_interleave(H // Hkv, dim=0))
        per_role["o"].append(w["o"].reshape(d, H, dh).permute(1, 0, 2))
    return {r: torch.stack(v) for r, v in per_role.items()}


def composition_scores(
    model: nn.Module, kind: str = "q", per_component: bool = False, *, layout: Optional[str] = None
) -> CompositionScores:
    """Q-, K- or V-composition (Elhage et al. 2021) between every head of layer ``i``
    and every head of layer ``j > i``.

    With ``W_OV = W_O^h W_V^h`` (writer, ``d×d``) and ``W_QK = W_Qᵀ W_K`` (reader),
    the score is ``‖M·W_OV‖_F / (‖M‖_F ‖W_OV‖_F)`` with ``M = W_QKᵀ`` (q),
    ``W_QK`` (k) or the reader's ``W_OV`` (v). Layer norms are not folded in.
    Per component (Merullo et al. 2024): ``‖M u_c‖ / ‖M‖_F`` for each left singular
    vector ``u_c`` of the writer's ``W_OV``.

    Every ``d×d`` product is rank ``dh``: with ``M = Aᵀ B`` and ``W_OV = X Y`` (``A, B,
    Y`` ``[dh, d]``, ``X`` ``[d, dh]``) and ``Aᵀ = Q_A R_A``, ``Yᵀ = Q_Y R_Y``, the
    score is ``‖B' X'‖_F / (‖B'‖_F ‖X'‖_F)`` with ``B' = R_A B``, ``X' = X R_Yᵀ``: one
    batched einsum of ``dh×d`` by ``d×dh`` per layer pair, no ``d×d`` matrix.

    Args:
        model: a BERT/Llama/GPT-2 style ``transformers`` model (see layouts).
        kind: ``"q"``, ``"k"`` or ``"v"``.
        per_component: also return the per-component scores.
        layout: force a layout instead of detecting it.

    Returns:
        :class:`CompositionScores` (float32; float64 for a float64 model).
    """
    if kind not in ("q", "k", "v"):
        raise ValueError(f"kind: expected 'q', 'k' or 'v', got {kind!r}")
    if not isinstance(per_component, bool):
        raise TypeError(f"per_component: expected a bool, got {type(per_component).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters()]
    dtype = torch.float64 if params and params[0].dtype == torch.float64 else torch.float32
    f = _head_factors(model, layout, dtype)
    Q, K, V, O = f["q"], f["k"], f["v"], f["o"]
    L, H, dh, d = Q.shape
    # Reader M = Aᵀ B; writer W_OV = X Y.
    A, Bm = {"q": (K, Q), "k": (Q, K), "v": (O.mT, V)}[kind]
    R_A = torch.linalg.qr(A.mT, mode="r")[1]  # [L, H, dh, dh]
    R_Y = torch.linalg.qr(V.mT, mode="r")[1]
    Bp = R_A @ Bm  # [L, H, dh, d]
    Xp = O @ R_Y.mT  # [L, H, d, dh]
    Uw, Sw, _ = torch.linalg.svd(Xp, full_matrices=False)  # left vectors of W_OV = X' Q_Yᵀ
    b_norm = torch.linalg.matrix_norm(Bp)  # [L, H]
    x_norm = torch.linalg.matrix_norm(Xp)
    scores = torch.full((L, H, L, H), math.nan, dtype=dtype, device=Q.device)
    comps = torch.full((L, H, dh, L, H), math.nan, dtype=dtype, device=Q.device) if per_component else None
    for i in range(L - 1):
        rd = Bp[i + 1:]  # readers of layers j > i: [Lj, H, dh, d]
        # Per component: B' u_c for every reader and writer head: [H_w, Lj, H_r, dh, dh(c)].
        P = torch.einsum("jbpd,adc->ajbpc", rd, Uw[i])
        col = torch.linalg.vector_norm(P, dim=-2)  # ‖B' u_c‖: [H_w, Lj, H_r, c]
        num = torch.linalg.vector_norm(col * Sw[i][:, None, None, :], dim=-1)  # ‖B' X'‖_F
        scores[i, :, i + 1:] = num / (b_norm[i + 1:][None] * x_norm[i][:, None, None])
        if comps is not None:
            comps[i, :, :, i + 1:] = (col / b_norm[i + 1:][None, :, :, None]).permute(0, 3, 1, 2)
    return CompositionScores(kind, scores.to(dtype), Sw.to(dtype), comps)
