"""Benchmark family ``train_methods``: training-time SVD methods (issue 15).

Three workloads, every baseline measured in the same run:

1. **Continual learning in orthogonal subspaces** (:class:`~svdkernels.train.OrthogonalSubspace`;
   quick mode: synthetic Gaussian tasks instead, :func:`synthetic_tasks`).
   A built-in sequence of three sentence-classification tasks: all-MiniLM-L6-v2 sentence
   embeddings (frozen, mean-pooled) of standard-library docstrings, each task telling
   apart the docstrings of four modules (:data:`CL_TASKS`, disjoint across tasks; every
   4th docstring held out). The model trained in sequence is a two-layer MLP trunk
   ``384→256→256`` shared by all tasks, plus a head per task (trained with its task and
   then kept). Methods: naive sequential full fine-tuning, sequential LoRA (rank 8 on the
   trunk, heads full), and OSF (full fine-tuning with each task's gradients orthogonal to
   the earlier tasks' top directions; io-similarity ranks; Adam guarded). Same seed, data
   order, optimiser (Adam) and steps for each. Reported: the mean accuracy on each task
   right after learning it (``new acc``), the final mean accuracy over all tasks, and
   the average forgetting (the mean over earlier tasks of accuracy right after learning
   minus final accuracy); time = mean training step, for OSF with the projection, and the
   same step without it (overhead).
2. **LOST pre-training** of the small Llama (:func:`svdkernels.testing.llama.small_llama`,
   narrow for a CPU) from scratch on the docstring corpus: full rank, LOST
   (``W = B·A + S`` on every projection) and low rank alone with the rank that gives the
   same parameter count. Held-out loss after a fixed number of steps, step time,
   parameters of the projections and the peak memory of one step (CPU: profiler).
3. **QVGen rank decay** on all-MiniLM-L6-v2: W4A4 (int4 weights group 64, signed int4
   activations) with the auxiliary ``Φ`` decayed from rank 32 to nothing while the
   quantised model is distilled towards the float model (loss ``1 − cos`` of the sentence
   embeddings plus the MSE of the last hidden states). Held-out embedding cosine to the
   float model of the resulting Φ-free W4A4 model (converted to the real int4 layers),
   against post-training round-to-nearest W4A4 (:func:`svdkernels.quant.quantize_model_rtn`).

Rows of further training-method workloads (another module's ``rows(quick) -> list``)
join the family through :data:`EXTRA_ROW_MODULES`.
"""
from __future__ import annotations

import copy
import importlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from svdkernels.bench import Row, bench_device, register

EXTRA_ROW_MODULES: tuple[str, ...] = ("svdkernels.bench.train_methods_fed",)
"""Modules (dotted names) with a function ``rows(quick: bool) -> list[Row]`` whose rows are
appended to this family (e.g. ``"svdkernels.bench.train_methods_fed"``)."""


# ---------------------------------------------------------------------------- continual learning

CL_TASKS: tuple[tuple[str, ...], ...] = (
    ("ast", "logging", "mailbox", "pydoc"),
    ("inspect", "pdb", "logging.handlers", "imaplib"),
    ("tarfile", "ssl", "unittest.case", "pathlib"),
)
"""The three tasks: which standard-library modules' docstrings each one classifies (the modules
with the most docstrings, at most :data:`CL_PER_MODULE` each)."""

CL_PER_MODULE = 60


@dataclass(frozen=True)
class CLWorkload:
    steps: int  # per task
    batch: int
    lr: float
    hidden: int = 256
    lora_rank: int = 8
    rank_fraction: float = 0.3
    max_tokens: int = 64

    @property
    def name(self) -> str:
        return (f"continual: 3 docstring tasks on MiniLM embeddings, MLP 384-{self.hidden}-{self.hidden}, "
                f"{self.steps} steps/task")


def cl_workload(quick: bool) -> CLWorkload:
    if quick:
        return CLWorkload(steps=4, batch=8, lr=3e-3, hidden=64, max_tokens=16)  # on synthetic_tasks()
    return CLWorkload(steps=300, batch=32, lr=3e-3, hidden=256, rank_fraction=0.3)


def cl_tasks(max_tokens: int = 64, max_per_module: int = CL_PER_MODULE) -> list[dict[str, torch.Tensor]]:
    """The tasks of :data:`CL_TASKS` as ``{"x_train", "y_train", "x_test", "y_test"}``:
    frozen MiniLM sentence embeddings ``[N, 384]`` of each docstring (first ``max_tokens``
    tokens) and the index of its module within the task; every 4th docstring is test."""
    from svdkernels.testing.llama import _module_docstrings
    from svdkernels.testing.models import minilm_model

    model, tok = minilm_model()
    tasks = []
    for modules in CL_TASKS:
        texts, labels = [], []
        for c, mod in enumerate(modules):
            docs = _module_docstrings(mod)[:max_per_module]
            texts += docs
            labels += [c] * len(docs)
        emb = []
        with torch.no_grad():
            for i in range(0, len(texts), 64):
                enc = tok(texts[i:i + 64], padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
                h = model(**enc).last_hidden_state
                mask = enc["attention_mask"][..., None].to(h.dtype)
                emb.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
        X, Y = torch.cat(emb), torch.tensor(labels)
        test = torch.arange(len(texts)) % 4 == 3
        tasks.append({"x_train": X[~test], "y_train": Y[~test], "x_test": X[test], "y_test": Y[test]})
    return tasks


def synthetic_tasks(n_tasks: int = 3, per_class: int = 8, dim: int = 384, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Quick-mode stand-in for :func:`cl_tasks` (no model to load): 4 Gaussian classes per
    task around random unit means, same layout of the result."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        means = torch.nn.functional.normalize(torch.randn(4, dim, generator=g), dim=-1)
        Y = torch.arange(4).repeat_interleave(per_class)
        X = torch.nn.functional.normalize(means[Y] + 0.05 * torch.randn(len(Y), dim, generator=g), dim=-1)
        test = torch.arange(len(Y)) % 4 == 3
        tasks.append({"x_train": X[~test], "y_train": Y[~test], "x_test": X[test], "y_test": Y[test]})
    return tasks


class _CLModel(nn.Module):
    def __init__(self, hidden: int, classes: int, n_tasks: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(384, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.heads = nn.ModuleList(nn.Linear(hidden, classes) for _ in range(n_tasks))

    def forward(self, x: torch.Tensor, task: int = 0) -> torch.Tensor:
        return self.heads[task](self.trunk(x))


def _accuracy(model: _CLModel, task: int, data: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((model(data["x_test"], task).argmax(-1) == data["y_test"]).float().mean())


def run_continual(method: str, wl: CLWorkload, tasks: list[dict[str, torch.Tensor]], *, seed: int = 0
                  ) -> dict[str, Any]:
    """Train ``method`` (``"full"``, ``"lora"``, ``"osf"``) on the tasks in sequence.

    Returns ``{"acc": [[acc of task j after task i] ...], "step_ms": median step}``.
    """
    from svdkernels.adapters import adapt, mark_only_adapter_trainable
    from svdkernels.train.orthogonal import OrthogonalSubspace

    model = _CLModel(wl.hidden, 4, len(tasks), seed)
    if method == "lora":
        adapt(model.trunk, "lora", rank=wl.lora_rank, seed=seed)
        mark_only_adapter_trainable(model.trunk)
    osf = OrthogonalSubspace(model, targets=r"trunk\.\d+", rank_fraction=wl.rank_fraction) if method == "osf" else None
    g = torch.Generator().manual_seed(seed + 1)
    acc: list[list[float]] = []
    times: list[float] = []
    for t, data in enumerate(tasks):
        params = [p for n, p in model.named_parameters() if p.requires_grad and
                  (not n.startswith("heads.") or n.startswith(f"heads.{t}."))]
        opt = torch.optim.Adam(params, lr=wl.lr)
        if osf is not None:
            calib = [data["x_train"][i:i + 64] for i in range(0, min(256, data["x_train"].shape[0]), 64)]
            osf.begin_task(calib, optimizer=opt)
        n = data["x_train"].shape[0]
        for _ in range(wl.steps):
            idx = torch.randint(n, (wl.batch,), generator=g)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(data["x_train"][idx], t), data["y_train"][idx])
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        if osf is not None:
            osf.end_task()
        acc.append([_accuracy(model, j, tasks[j]) for j in range(t + 1)])
    return {"acc": acc, "step_ms": 1e3 * sorted(times)[len(times) // 2]}


def forgetting(acc: list[list[float]]) -> float:
    """Mean over the earlier tasks of (accuracy right after learning − final accuracy)."""
    final = acc[-1]
    drops = [acc[j][j] - final[j] for j in range(len(acc) - 1)]
    return sum(drops) / len(drops)


def _continual_rows(quick: bool) -> Iterator[Row | str]:
    wl = cl_workload(quick)
    name = wl.name
    yield name
    tasks = synthetic_tasks() if quick else cl_tasks(wl.max_tokens)
    seeds = (0,) if quick else (0, 1, 2)
    runs = {m: [run_continual(m, wl, tasks, seed=sd) for sd in seeds] for m in ("full", "lora", "osf")}

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    full_f = mean([forgetting(r["acc"]) for r in runs["full"]])
    full_ms = mean([r["step_ms"] for r in runs["full"]])
    labels = {"full": "naive sequential full fine-tuning", "lora": f"sequential LoRA r{wl.lora_rank}",
              "osf": f"ours: OrthogonalSubspace (rank_fraction {wl.rank_fraction}, io_similarity)"}
    for m, rs in runs.items():
        f = mean([forgetting(r["acc"]) for r in rs])
        step = mean([r["step_ms"] for r in rs])
        errs = {"new acc": mean([mean([r["acc"][j][j] for j in range(len(tasks))]) for r in rs]),
                "final mean acc": mean([mean(r["acc"][-1]) for r in rs]), "forgetting": f}
        if full_f > 0:
            errs["forgetting/full FT"] = f / full_f
        if m == "osf":  # the unprojected step is naive full fine-tuning's (same model and optimiser)
            errs["overhead"] = step / full_ms - 1
        note = (f"mean of seeds {seeds}; seed 0, accuracy after each task: "
                + "; ".join("/".join(f"{a:.2f}" for a in row) for row in rs[0]["acc"]))
        yield Row(name, labels[m], step, kind="ours" if m == "osf" else "peer", errors=errs, note=note)


# ---------------------------------------------------------------------------- OSF overhead on an LM step


@dataclass(frozen=True)
class LlamaWorkload:
    steps: int
    batch: int
    seq_len: int
    lr: float
    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    heads: int = 4
    heldout_blocks: int = 64

    @property
    def name(self) -> str:
        return f"Llama h{self.hidden} L{self.layers}, {self.batch}x{self.seq_len} tokens/step"


def llama_workload(quick: bool) -> LlamaWorkload:
    if quick:
        return LlamaWorkload(steps=3, batch=2, seq_len=16, lr=2e-3, hidden=64, intermediate=172, layers=1, heads=2,
                             heldout_blocks=4)
    return LlamaWorkload(steps=80, batch=4, seq_len=64, lr=2e-3)


def _llama(wl: LlamaWorkload, seed: int = 0) -> nn.Module:
    from svdkernels.testing.llama import small_llama

    return small_llama(hidden=wl.hidden, intermediate=wl.intermediate, layers=wl.layers, heads=wl.heads, seed=seed)


def _osf_overhead_rows(quick: bool) -> Iterator[Row | str]:
    """One AdamW step of the small Llama with and without OSF (25% of every projection's
    rank frozen, projection hooks and the optimiser guard), interleaved step by step."""
    from svdkernels.testing.llama import LLAMA_TARGETS, lm_loss, token_blocks
    from svdkernels.train.orthogonal import OrthogonalSubspace

    wl = llama_workload(quick)
    name = f"OSF overhead: {wl.name}, 25% of each projection frozen"
    yield name
    blocks = token_blocks("train", wl.seq_len)
    models = {k: _llama(wl) for k in ("plain", "hooks", "guard")}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=wl.lr, weight_decay=0.0) for k, m in models.items()}
    for k in ("hooks", "guard"):
        osf = OrthogonalSubspace(models[k], targets=LLAMA_TARGETS, rank_fraction=0.25, importance="uniform")
        osf.begin_task()
        osf.end_task()
        osf.begin_task(optimizer=opts[k] if k == "guard" else None)
    times: dict[str, list[float]] = {k: [] for k in models}
    n = 2 if quick else 12
    for i in range(n + 1):
        batch = blocks[(i * wl.batch) % (blocks.shape[0] - wl.batch):][:wl.batch]
        for k, m in models.items():
            t0 = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            lm_loss(m, batch).backward()
            opts[k].step()
            if i:  # the first round warms up
                times[k].append(time.perf_counter() - t0)
    med = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}
    yield Row(name, "AdamW step, no projection", med["plain"], kind="peer")
    yield Row(name, "ours: OSF gradient projection (hooks)", med["hooks"], kind="ours",
              errors={"overhead": med["hooks"] / med["plain"] - 1})
    yield Row(name, "ours: OSF projection + optimiser guard", med["guard"],
              errors={"overhead": med["guard"] / med["plain"] - 1})


# ---------------------------------------------------------------------------- LOST


def lost_workload(quick: bool) -> LlamaWorkload:
    """LOST's pre-training runs: three from scratch, so narrower than the overhead model."""
    if quick:
        return llama_workload(True)
    return LlamaWorkload(steps=120, batch=4, seq_len=32, lr=2e-3, hidden=128, intermediate=344, layers=2, heads=2,
                         heldout_blocks=32)


def lost_ranks(wl: LlamaWorkload) -> tuple[int, int]:
    """LOST's ``(rank, sparse_channels)`` for the workload: a quarter of the width and an eighth."""
    return wl.hidden // 4, wl.hidden // 8


def _projection_params(model: nn.Module) -> int:
    from svdkernels.train.lost import LowRankSparseLinear

    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Linear, LowRankSparseLinear))
               for p in m.parameters(recurse=False) if m is not getattr(model, "lm_head", None))


def _lost_rows(quick: bool) -> Iterator[Row | str]:
    from svdkernels.bench.optim import peak_bytes
    from svdkernels.testing.llama import LLAMA_TARGETS, heldout_loss, lm_loss, token_blocks
    from svdkernels.train.lost import lost_init

    wl = lost_workload(quick)
    rank, channels = lost_ranks(wl)
    name = f"LOST pre-training: {wl.name}, {wl.steps} steps, rank {rank} + {channels} channels"
    device = bench_device()
    train = token_blocks("train", wl.seq_len)
    held = token_blocks("heldout", wl.seq_len, max_blocks=wl.heldout_blocks).to(device)

    def lowrank_same(model: nn.Module) -> None:
        # Low rank alone at LOST's parameter count, per shape: r' = r + ⌊out·c/(in+out)⌋.
        from svdkernels.train.lost import lowrank_rank_at_same_params

        import re

        shapes = {tuple(m.weight.shape) for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and re.fullmatch(LLAMA_TARGETS, n)}
        for out_f, in_f in shapes:
            r2 = lowrank_rank_at_same_params(in_f, out_f, rank, channels)
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                     and re.fullmatch(LLAMA_TARGETS, n) and tuple(m.weight.shape) == (out_f, in_f)]
            lost_init(model, r2, 0, targets=names)

    variants: dict[str, Callable[[nn.Module], Any]] = {
        "full rank (AdamW)": lambda m: None,
        f"ours: LOST r{rank} + {channels} channels": lambda m: lost_init(m, rank, channels, targets=LLAMA_TARGETS),
        "low rank alone, same parameters": lowrank_same,
    }
    for label, convert in variants.items():
        yield name
        model = _llama(wl)
        convert(model)
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=wl.lr, weight_decay=0.0)
        times = []
        for i in range(wl.steps):
            batch = train[(i * wl.batch) % (train.shape[0] - wl.batch):][:wl.batch].to(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            lm_loss(model, batch).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        loss = heldout_loss(model, held)
        opt.zero_grad(set_to_none=True)
        batch = train[:wl.batch].to(device)
        peak = peak_bytes(lambda: lm_loss(model, batch).backward(), device)
        step_ms = 1e3 * sorted(times)[len(times) // 2]
        yield Row(name, label, step_ms, kind="ours" if label.startswith("ours") else "peer",
                  errors={"heldout loss": loss, "proj. params M": _projection_params(model) / 1e6,
                          "peak MB": peak / 1e6})


# ---------------------------------------------------------------------------- QVGen


MINILM_TARGETS = r"encoder\.layer\.\d+\..*"
"""The encoder's linear layers (the pooler is not part of the sentence embedding)."""


@dataclass(frozen=True)
class QVGenWorkload:
    every: int
    start_rank: int
    extra_steps: int
    batch: int
    block: int
    lr: float
    calib_blocks: int
    heldout_blocks: int

    @property
    def name(self) -> str:
        return (f"QVGen W4A4 MiniLM: rank {self.start_rank} halved every {self.every} steps, then "
                f"{self.extra_steps} steps; {self.batch}x{self.block} tokens/step")


def qvgen_workload(quick: bool) -> QVGenWorkload:
    if quick:
        return QVGenWorkload(every=1, start_rank=2, extra_steps=0, batch=1, block=32, lr=1e-5, calib_blocks=2,
                             heldout_blocks=2)
    # Sized for a loaded 2-core CPU (about 4 minutes there); a GPU run can raise every to 200 as in the paper.
    return QVGenWorkload(every=5, start_rank=32, extra_steps=10, batch=2, block=32, lr=5e-5, calib_blocks=256,
                         heldout_blocks=32)


def _embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    h = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(h.dtype)
    return h, torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def _stack(blocks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in blocks]) for k in blocks[0]}


def _qvgen_rows(quick: bool, progress: Optional[Callable[[int, int, float], None]] = None) -> Iterator[Row | str]:
    from svdkernels.quant import quantize_model_rtn
    from svdkernels.testing.models import minilm_model, sentence_embeddings
    from svdkernels.testing.text import CALIB_MODULES, HELDOUT_MODULES, stdlib_text, token_blocks
    from svdkernels.train.rank_decay import RankDecay

    wl = qvgen_workload(quick)
    name = wl.name
    yield name
    teacher, tok = minilm_model()
    calib = token_blocks(tok, stdlib_text(CALIB_MODULES), block=wl.block, n_blocks=wl.calib_blocks)
    held = token_blocks(tok, stdlib_text(HELDOUT_MODULES), block=wl.block, n_blocks=wl.heldout_blocks)
    ref = sentence_embeddings(teacher, held)

    def cosine(model: nn.Module) -> float:
        return float((sentence_embeddings(model, held) * ref).sum(-1).mean())

    rtn = quantize_model_rtn(copy.deepcopy(teacher), acts="int4", targets=MINILM_TARGETS)
    rtn_cos = cosine(rtn)
    student = copy.deepcopy(teacher).train()
    for p in student.parameters():
        p.requires_grad_(True)
    rd = RankDecay(student, start_rank=wl.start_rank, every=wl.every, targets=MINILM_TARGETS)
    student.eval()  # dropout off: distillation of a deterministic function
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=wl.lr, weight_decay=0.0)
    steps = rd.total_steps + wl.extra_steps
    times = []
    losses = []
    for i in range(steps):
        batch = _stack([calib[(i * wl.batch + j) % len(calib)] for j in range(wl.batch)])
        t0 = time.perf_counter()
        with torch.no_grad():
            h_t, e_t = _embed(teacher, batch)
        h_s, e_s = _embed(student, batch)
        loss = (1 - (e_s * e_t).sum(-1)).mean() + torch.nn.functional.mse_loss(h_s, h_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rd.step(opt)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(i, steps, losses[-1])
    assert rd.finished
    qat = rd.to_quantized()
    qat_cos = cosine(qat)
    step_ms = 1e3 * sorted(times)[len(times) // 2]
    yield Row(name, "round-to-nearest W4A4 (post-training)", None, kind="peer", errors={"heldout cos": rtn_cos})
    yield Row(name, "ours: RankDecay QAT, Φ-free W4A4", step_ms, kind="ours",
              errors={"heldout cos": qat_cos, "Δcos vs RTN": qat_cos - rtn_cos, "first loss": losses[0],
                      "last loss": losses[-1]}, note=f"{steps} steps; converted to real int4 layers (rank 0)")


# ---------------------------------------------------------------------------- the family


def extra_rows(quick: bool) -> list[Row]:
    """The rows of :data:`EXTRA_ROW_MODULES`, in order."""
    out: list[Row] = []
    for mod in EXTRA_ROW_MODULES:
        out.extend(importlib.import_module(mod).rows(quick))
    return out


LEGEND = (
    "continual: new acc = mean accuracy on each task right after learning it; forgetting = mean drop of the earlier "
    "tasks' accuracy by the end (targets: OSF forgetting <= 1/3 of full FT's, new acc within 0.05; overhead = OSF "
    "step over the unprojected step - 1, target <= 0.15 on the LM step). LOST: held-out loss after the same steps "
    "(target: LOST <= low rank alone at the same projection parameters). QVGen: held-out cosine of the sentence "
    "embeddings to the float model (target: the Φ-free W4A4 model above round-to-nearest W4A4). FedSVD: "
    "aggregation against the dense SVD of B·A (target >= 20x, equal to fp tolerance) and held-out accuracy "
    "after the same rounds against LoRA averaging and FFA-LoRA."
)


def _count(quick: bool) -> int:
    return 1 + 1 + 3 + 1 + len(EXTRA_ROW_MODULES)


@register("train_methods", count=_count, legend=LEGEND)
def bench_train_methods(quick: bool, repeats: int) -> Iterator[Row | str]:
    """OSF continual learning (and its step overhead on an LM), LOST pre-training, QVGen rank decay."""
    yield from _continual_rows(quick)
    yield from _osf_overhead_rows(quick)
    yield from _lost_rows(quick)
    yield from _qvgen_rows(quick)
    yield from extra_rows(quick)
