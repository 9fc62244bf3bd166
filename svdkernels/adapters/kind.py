"""KIND (Xie et al. 2024, "KIND: Knowledge Integration and Diversion in Diffusion
Models"): weights as SVD components, split into class-agnostic *learngenes* and
class-gated *tailors*.

Each adapted ``nn.Linear`` becomes a :class:`KindLinear`::

    y = x·W_resᵀ + ((x·V_lᵀ)⊙σ_l)·U_lᵀ + ((x·V_tᵀ)⊙σ_t⊙g_c)·U_tᵀ + bias

- learngenes ``U_l [out, r]``, ``σ_l [r]``, ``V_l [r, in]``: the top ``r`` singular
  components of the weight, trainable, shared by every class (the knowledge to
  integrate and pass on);
- tailors ``U_t [out, t]``, ``σ_t [t]``, ``V_t [t, in]``: the next ``t`` singular
  directions, trainable, each owned by one class through a fixed binary gate
  ``g [classes, t]`` (component ``j`` belongs to class ``j mod classes``), so a sample
  of class ``c`` trains and uses only class ``c``'s tailors (knowledge diversion).
  ``σ_t`` starts at 0, so outputs are unchanged at initialisation;
- ``W_res = W₀ − U_l·diag(σ_l)·V_l`` frozen (rebuilt bit for bit on load).

The paper builds this into a DiT pre-trained with class labels; here it is an adapter
on any model's linear layers (``kind_adapt``; ``adapt(model, "kind", ...)`` once
wired). :func:`extract_learngenes` returns the class-agnostic model (residual plus
learngenes folded into plain ``nn.Linear`` weights) to initialise a new model, e.g.
for new classes with fresh tailors. There is no class-free merge of the tailors
(they depend on the class); the learngenes merge in :func:`extract_learngenes`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from svdkernels.adapters.modules import Targets, find_linears, saved_base_linear, set_module
from svdkernels.errors import FormatError
from svdkernels.ops.rsvd import rsvd

FORMAT = "svdkernels.kind_adapter"
VERSION = 1
TRAINABLE = ("kind_U", "kind_S", "kind_V", "tailor_U", "tailor_S", "tailor_V")
TENSORS = (*TRAINABLE, "tailor_gate", "removed_up", "removed_down")


def class_gate(classes: int, tailor_rank: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``[classes, t]`` bool: component ``j`` belongs to class ``j mod classes``."""
    j = torch.arange(tailor_rank, device=device)
    return j[None, :] % classes == torch.arange(classes, device=device)[:, None]


def _residual(W0: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    from svdkernels.adapters.adapt import residual_weight  # adapt imports this module's users

    return residual_weight(W0, up, down)


class KindLinear(nn.Module):
    """A frozen residual weight plus learngene and class-gated tailor components.

    Shapes: ``x [b, ..., in]``, ``class_ids [b]`` (int, in ``[0, classes)``) →
    ``y [b, ..., out]``. Build with :func:`kind_adapt`.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], parts: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        for name in TRAINABLE:
            setattr(self, name, nn.Parameter(parts[name]))
        for name in ("tailor_gate", "removed_up", "removed_down"):
            self.register_buffer(name, parts[name])
        self.class_ids: Optional[torch.Tensor] = None  # set by kind_classes()

    @property
    def rank(self) -> int:
        return self.kind_S.shape[0]

    @property
    def tailor_rank(self) -> int:
        return self.tailor_S.shape[0]

    @property
    def classes(self) -> int:
        return self.tailor_gate.shape[0]

    def _check_ids(self, x: torch.Tensor, class_ids: Optional[torch.Tensor]) -> torch.Tensor:
        if class_ids is None:
            raise ValueError("class_ids: expected a [batch] tensor of class labels (KIND's tailors are class-gated; "
                             "pass forward(x, class_ids) or use kind_classes(model, class_ids)), got None")
        if not isinstance(class_ids, torch.Tensor) or class_ids.dtype not in (torch.int64, torch.int32) or \
                class_ids.dim() != 1 or x.dim() < 2 or class_ids.shape[0] != x.shape[0]:
            got = f"{class_ids.dtype} {list(class_ids.shape)}" if isinstance(class_ids, torch.Tensor) else \
                type(class_ids).__name__
            raise ValueError(f"class_ids: expected an int tensor [batch] with batch = x.shape[0] "
                             f"(x is {list(x.shape)}), got {got}")
        if class_ids.numel() and (int(class_ids.min()) < 0 or int(class_ids.max()) >= self.classes):
            raise ValueError(f"class_ids: expected labels in [0, {self.classes}), got values in "
                             f"[{int(class_ids.min())}, {int(class_ids.max())}]")
        return class_ids

    def forward(self, x: torch.Tensor, class_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 \
                or x.shape[-1] != self.in_features:
            got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a floating-point tensor [batch, ..., {self.in_features}], got {got}")
        ids = self._check_ids(x, self.class_ids if class_ids is None else class_ids)
        x = x.to(self.kind_U.dtype)
        y = F.linear(x, self.weight, self.bias)
        h = F.linear(x, self.kind_V) * self.kind_S  # [..., r]
        g = self.tailor_gate[ids].to(x.dtype) * self.tailor_S  # [b, t]: class c's own σ_t
        ht = F.linear(x, self.tailor_V) * g.view(g.shape[0], *([1] * (x.dim() - 2)), g.shape[1])
        return y + F.linear(h, self.kind_U) + F.linear(ht, self.tailor_U)

    def learngene_weight(self) -> torch.Tensor:
        """``W_res + U_l·diag(σ_l)·V_l`` (float32 sum, in the weight's dtype): the class-agnostic weight."""
        lg = (self.kind_U.float() * self.kind_S.float()) @ self.kind_V.float()
        return (self.weight.float() + lg).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, learngenes={self.rank}, "
                f"tailors={self.tailor_rank}, classes={self.classes}")


def _check_int(name: str, v: object, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {v}")
    return v


def kind_adapt(model: nn.Module, *, rank: int = 16, tailor_rank: int, classes: int, targets: Targets = None,
               seed: int = 0) -> nn.Module:
    """Replace ``model``'s target linear layers by :class:`KindLinear`, in place.

    Args:
        rank: learngene components per layer (``r``).
        tailor_rank: tailor components per layer (``t >= classes``; each class owns
            ``⌈t/classes⌉`` or ``⌊t/classes⌋``), ``r + t <= min(out, in)``.
        classes: number of class labels.
        targets: as :func:`svdkernels.adapt`'s.
        seed: the randomized SVD's.

    One :func:`svdkernels.rsvd` of rank ``r + t`` per shape group gives the components.
    Every parameter but the learngenes and tailors is frozen. Returns ``model`` (a bare
    ``nn.Linear`` is returned as its :class:`KindLinear`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_int("rank", rank, 1)
    _check_int("classes", classes, 1)
    _check_int("tailor_rank", tailor_rank, 1)
    if tailor_rank < classes:
        raise ValueError(f"tailor_rank: expected >= classes = {classes} (every class owns a tailor), got {tailor_rank}")
    layers = find_linears(model, targets)
    for name, lin in layers.items():
        k = min(lin.in_features, lin.out_features)
        if rank + tailor_rank > k:
            raise ValueError(f"rank: expected rank + tailor_rank <= {k} for layer {name!r} ({lin.out_features}x"
                             f"{lin.in_features}), got {rank} + {tailor_rank}")
    groups: dict[tuple, list[str]] = {}
    for name, lin in layers.items():
        groups.setdefault((lin.out_features, lin.in_features, lin.weight.dtype, lin.weight.device), []).append(name)
    built: dict[str, KindLinear] = {}
    for (_, _, dtype, device), names in groups.items():
        W = torch.stack([layers[n].weight.detach().float() for n in names])
        U, S, Vh = rsvd(W, rank + tailor_rank, seed=seed)
        for i, n in enumerate(names):
            lin = layers[n]
            up, down = (U[i, :, :rank] * S[i, :rank]).contiguous(), Vh[i, :rank].contiguous()
            parts = {"kind_U": U[i, :, :rank], "kind_S": S[i, :rank], "kind_V": Vh[i, :rank],
                     "tailor_U": U[i, :, rank:], "tailor_S": torch.zeros(tailor_rank), "tailor_V": Vh[i, rank:]}
            parts = {k: v.to(dtype=dtype, device=device, copy=True).contiguous() for k, v in parts.items()}
            parts.update(tailor_gate=class_gate(classes, tailor_rank, device), removed_up=up.to(device),
                         removed_down=down.to(device))
            bias = None if lin.bias is None else lin.bias.detach().clone()
            built[n] = KindLinear(_residual(lin.weight.detach(), up.to(device), down.to(device)), bias, parts)
    return _install(model, built)


def _install(model: nn.Module, built: dict[str, KindLinear]) -> nn.Module:
    for name, layer in built.items():
        if name == "":
            model = layer
        else:
            set_module(model, name, layer)
    keep = {id(getattr(m, t)) for m in model.modules() if isinstance(m, KindLinear) for t in TRAINABLE}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model


def kind_layers(model: nn.Module) -> dict[str, KindLinear]:
    """Every :class:`KindLinear` of ``model``, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, KindLinear)}


@contextlib.contextmanager
def kind_classes(model: nn.Module, class_ids: torch.Tensor) -> Iterator[nn.Module]:
    """Within the block, every :class:`KindLinear` of ``model`` gates its tailors by
    ``class_ids [batch]`` (for models whose ``forward`` takes only ``x``)."""
    layers = list(kind_layers(model).values())
    if not layers:
        raise ValueError("model: expected layers adapted by kind_adapt, found none")
    for m in layers:
        m.class_ids = class_ids
    try:
        yield model
    finally:
        for m in layers:
            m.class_ids = None


@torch.no_grad()
def extract_learngenes(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each :class:`KindLinear` replaced by an ``nn.Linear``
    whose weight is ``W_res + U_l·diag(σ_l)·V_l``: the class-agnostic part, tailors
    dropped, to initialise a new model (all its parameters trainable)."""
    layers = kind_layers(model)
    if not layers:
        raise ValueError("model: expected layers adapted by kind_adapt, found none")
    new = copy.deepcopy(model)
    for name, m in kind_layers(new).items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                        dtype=m.weight.dtype)
        lin.weight.copy_(m.learngene_weight())
        if m.bias is not None:
            lin.bias.copy_(m.bias)
        if name == "":
            new = lin
        else:
            set_module(new, name, lin)
    for p in new.parameters():
        p.requires_grad_(True)
    return new


# ---------------------------------------------------------------------------
# safetensors


def save_kind(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every :class:`KindLinear`'s own tensors (not the base weight) to ``path``
    (safetensors, metadata ``format``, ``version``, ``layers``)."""
    layers = kind_layers(model)
    if not layers:
        raise ValueError("model: expected layers adapted by kind_adapt, found none")
    tensors, meta = {}, {}
    for name, m in layers.items():
        for key in TENSORS:
            tensors[f"{name}.{key}"] = getattr(m, key).detach().contiguous().cpu()
        meta[name] = {"in_features": m.in_features, "out_features": m.out_features}
    save_file(tensors, str(path), metadata={"format": FORMAT, "version": str(VERSION), "layers": json.dumps(meta)})


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - not a safetensors file
        raise FormatError(path, f"not a readable safetensors file ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION) or set(meta) != {
            "format", "version", "layers"}:
        raise FormatError(path, f"expected metadata format = {FORMAT!r}, version = '{VERSION}' and layers "
                                f"(a file written by save_kind), got {sorted(meta)} with format "
                                f"{meta.get('format')!r}, version {meta.get('version')!r}")
    try:
        layers = json.loads(meta["layers"])
    except ValueError as e:
        raise FormatError(path, f"metadata 'layers' is not valid JSON ({e})") from e
    if not isinstance(layers, dict) or not layers:
        raise FormatError(path, "expected metadata 'layers' to be a non-empty JSON object")
    by_layer: dict[str, dict[str, torch.Tensor]] = {n: {} for n in layers}
    for key, t in tensors.items():
        name, _, part = key.rpartition(".")
        if name not in by_layer:
            raise FormatError(path, f"unexpected tensor {key!r}: it belongs to no layer of the metadata")
        by_layer[name][part] = t
    for name, info in layers.items():
        if not isinstance(info, dict) or set(info) != {"in_features", "out_features"} or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in info.values()):
            raise FormatError(path, f"layer {name!r}: expected metadata {{in_features, out_features}} "
                                    f"positive ints, got {info!r}")
        if set(by_layer[name]) != set(TENSORS):
            got = set(by_layer[name])
            raise FormatError(path, f"layer {name!r}: expected tensors {sorted(TENSORS)}, missing "
                                    f"{sorted(set(TENSORS) - got)}, unexpected {sorted(got - set(TENSORS))}")
    return layers, by_layer


def _check_tensors(path: str | os.PathLike, name: str, info: dict, t: dict[str, torch.Tensor],
                   dtype: torch.dtype) -> None:
    out_f, in_f = info["out_features"], info["in_features"]
    r = t["kind_S"].shape[0] if t["kind_S"].dim() == 1 else -1
    tr = t["tailor_S"].shape[0] if t["tailor_S"].dim() == 1 else -1
    c = t["tailor_gate"].shape[0] if t["tailor_gate"].dim() == 2 else -1
    want = {"kind_U": (out_f, r), "kind_S": (r,), "kind_V": (r, in_f), "tailor_U": (out_f, tr), "tailor_S": (tr,),
            "tailor_V": (tr, in_f), "tailor_gate": (c, tr), "removed_up": (out_f, r), "removed_down": (r, in_f)}
    if r < 1 or tr < 1 or c < 1 or r + tr > min(out_f, in_f):
        raise FormatError(path, f"layer {name!r}: expected 1 <= learngenes, 1 <= tailors, learngenes + tailors "
                                f"<= {min(out_f, in_f)} and a 2-D gate, got {r}, {tr}, gate "
                                f"{list(t['tailor_gate'].shape)}")
    for part, tensor in t.items():
        if tuple(tensor.shape) != want[part]:
            raise FormatError(path, f"tensor '{name}.{part}': expected shape {list(want[part])}, "
                                    f"got {list(tensor.shape)}")
        want_dtype = torch.bool if part == "tailor_gate" else torch.float32 if part.startswith("removed") else dtype
        if tensor.dtype != want_dtype:
            raise FormatError(path, f"tensor '{name}.{part}': expected dtype {want_dtype}, got {tensor.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FormatError(path, f"tensor '{name}.{part}': expected finite values, got NaN or inf")
    if not bool(t["tailor_gate"].any(1).all()):
        raise FormatError(path, f"tensor '{name}.tailor_gate': expected every class to own a tailor component")
    if c > tr or not torch.equal(t["tailor_gate"], class_gate(c, tr)):
        # kind_adapt's gate is fixed by (classes, tailors): component j belongs to class j mod classes alone
        raise FormatError(path, f"tensor '{name}.tailor_gate': expected class_gate({c}, {tr}) (component j owned "
                                f"by class j mod {c} alone, classes <= tailors), got another gate")


def load_kind(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the layers :func:`save_kind` wrote on ``model`` (the original model), in
    place; outputs are bit-identical. The whole file is checked first
    (:class:`~svdkernels.errors.FormatError`); the model changes only if it is valid."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layers, by_layer = _read(path)
    built: dict[str, KindLinear] = {}
    for name, info in layers.items():
        base = saved_base_linear(model, name, info)
        _check_tensors(path, name, info, by_layer[name], base.weight.dtype)
        dev = base.weight.device
        parts = {k: v.to(dev) for k, v in by_layer[name].items()}
        bias = None if base.bias is None else base.bias.detach().clone()
        built[name] = KindLinear(_residual(base.weight.detach(), parts["removed_up"], parts["removed_down"]), bias,
                                 parts)
    return _install(model, built)
