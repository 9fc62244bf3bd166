"""``python -m svdkernels gpucheck --out DIR`` (and ``scripts/gpu_check.sh DIR``): one
command that proves the Triton kernels on a real GPU within a few minutes.

A lent GPU machine comes with its own Python, torch and triton, no network and a
short lease, so the check must run in one go with nothing to debug on the spot.
It runs a fixed list of stages, each in child processes under its own time budget
(a stage that overruns is killed, reported as ``timeout``, and the next one runs):

``environment``
    GPU, driver, CUDA, torch, triton, SM count; imports svdkernels and checks that
    every op registered (the compatibility smoke test for the machine's versions).
``build``
    the optional C++ extension, built in place with the machine's torch; a failed
    build is a note, not a failure (the kernel tests do not need it).
``kernel_tests``
    ``pytest tests/triton tests/ops`` with ``TRITON_INTERPRET`` unset, so every kernel
    runs for real against the reference (bf16/fp16, the int8 tensor-core paths,
    determinism); pass/fail per op family. The sm_80/sm_90 compile check is left
    out: on a GPU the tests compile the kernels anyway.
``bench``
    ``python -m svdkernels bench --quick --device cuda``, one child per family so
    that a family cut by the budget keeps the ones before it.
``compile`` (opt-in)
    ``tests/triton/test_compile.py``, last, under its own budget.
``report``
    ``gpucheck.json`` (everything), ``report.md`` (pass/fail per family, the bench
    tables, the fraction of the roofline per kernel), ``bench.json``, ``bench.png``
    and ``gpucheck.log``: at most :data:`MAX_FILES` files in DIR.

``--dry-run`` runs every stage on the CPU (the kernel tests under the interpreter
on a small ``-k`` subset, one cheap bench family, the build only probed), so the
test suite checks the script itself.

This module sits at the top beside ``bench`` and ``__main__``: it imports only the
standard library (the parent process never imports torch, so a hung CUDA call in
a child cannot stall the budget keeping) and no library code imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "svdkernels.gpucheck/1"
MAX_FILES = 8

STAGES = ("environment", "build", "kernel_tests", "bench", "compile", "report")
"""Every stage, in the order they run."""
DEFAULT_STAGES = ("environment", "build", "kernel_tests", "bench", "report")

# Seconds per stage on one H100: 40+50+200+150+20 = 460 s even if every stage ran to
# its budget, inside the 8 minutes the issue allows. The kernel tests come first in
# importance (they include the cold Triton compiles); the C++ build serves only the
# CPU backend. The compile check is opt-in.
DEFAULT_BUDGETS: dict[str, float] = {
    "environment": 40.0,
    "build": 50.0,
    "kernel_tests": 200.0,
    "bench": 150.0,
    "compile": 120.0,
    "report": 20.0,
}
# The dry run is meant for a 2-core CI machine shared with other jobs.
DRY_RUN_BUDGETS: dict[str, float] = {
    "environment": 60.0,
    "build": 30.0,
    "kernel_tests": 120.0,
    "bench": 120.0,
    "compile": 120.0,
    "report": 60.0,
}

BENCH_FAMILIES = ("rsvd", "kron_linear", "lowrank_quant", "lowrank_attention", "optim")
"""The families whose ops have Triton kernels (optim: ``lowrank_adam_step``), benched by default."""
DRY_RUN_BENCH_FAMILIES = ("kron_linear",)  # the cheapest kernel family on a CPU (~20 s)

KERNEL_TEST_PATHS = ("tests/triton", "tests/ops")
# A small, fast subset that still touches every family: bad input, empty and zero-size cases.
DRY_RUN_K = "errors or empty or zero_tokens or bad_input or names_the_argument"
# Many failures in a row mean a broken environment, not many bugs: stop before the
# budget is spent on cascades, but keep going past the first so that one run shows
# every family (a lent GPU is rare).
MAX_FAIL = 25

OPS = ("rsvd", "kron_linear", "lowrank_w4a16_linear", "lowrank_quantize_act", "lowrank_w4a4_gemm",
       "lowrank_attention", "lowrank_adam_step")
"""Ops that must exist under ``torch.ops.svdkernels`` once svdkernels is imported."""

STATUSES = ("ok", "failed", "timeout", "skipped")
LOG_TAIL = 4000  # characters of a stage's output kept in the JSON


# --------------------------------------------------------------------------- stages


@dataclass
class StageResult:
    """What one stage did. ``status`` is one of :data:`STATUSES`."""

    name: str
    status: str
    wall_s: float
    budget_s: float
    note: str = ""
    commands: list[str] = field(default_factory=list)
    returncode: int | None = None
    output_tail: str = ""


@dataclass
class Context:
    """Shared state of one check: where things go and what earlier stages found."""

    repo: Path
    out_dir: Path
    work: Path  # scratch directory (not OUT_DIR): junit XML, raw bench output
    dry_run: bool
    python: str = sys.executable
    log: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def env(self, *, interpret: bool) -> dict[str, str]:
        """The children's environment: the working tree first on the path and the
        interpreter on only where asked (it must be decided before triton is imported)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.repo), env.get("PYTHONPATH", "")) if p)
        env.pop("TRITON_INTERPRET", None)
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env


class StageTimeout(Exception):
    """A child outlived the stage's budget and was killed; ``output`` is what it printed."""

    def __init__(self, output: str) -> None:
        super().__init__("stage budget exceeded")
        self.output = output


class _Clock:
    """The deadline of the running stage: every child gets what is left of it."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()


def call(ctx: Context, clock: _Clock, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
         label: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the repository with what is left of the stage's budget.

    The child gets a session of its own so that a timeout kills it together with its
    own children (pytest-xdist workers, compile workers). Output (stdout and stderr
    merged) goes to the check's log. Raises :class:`StageTimeout` when cut."""
    left = clock.left()
    text = " ".join(cmd)
    ctx.log.append(f"\n$ {text}\n")
    if left <= 0:
        raise StageTimeout("")
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        # A file, not a pipe: a chatty child can never block on a full pipe.
        child = subprocess.Popen(list(cmd), cwd=ctx.repo, env=dict(env) if env is not None else None,
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 text=True, start_new_session=True)
        try:
            rc = child.wait(timeout=left)
        except subprocess.TimeoutExpired:
            _kill_group(child)
            out.seek(0)
            output = out.read()
            ctx.log.append(output + f"\n[gpucheck] {label or cmd[0]}: killed at the stage budget\n")
            raise StageTimeout(output) from None
        out.seek(0)
        output = out.read()
    ctx.log.append(output)
    return subprocess.CompletedProcess(list(cmd), rc, output, "")


def _kill_group(child: subprocess.Popen[str]) -> None:
    """SIGTERM the child's process group, SIGKILL what is left after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


StageFn = Callable[[Context, _Clock, StageResult], None]
"""A stage body: fills in the result (status, note, ...) and may raise StageTimeout."""


def run_stages(ctx: Context, stages: Sequence[tuple[str, float, StageFn]]) -> list[StageResult]:
    """Run ``(name, budget_s, fn)`` stages in order, each under its budget.

    A stage cut by its budget is reported as ``timeout`` (with what its children
    printed) and the next stage still runs; so does one that raises."""
    results = []
    for name, budget, fn in stages:
        if not budget > 0:
            raise ValueError(f"budget: stage {name!r} needs a positive budget in seconds, got {budget}")
        result = StageResult(name, "ok", 0.0, float(budget))
        ctx.log.append(f"\n===== stage {name} (budget {budget:g} s) =====\n")
        print(f"[gpucheck] {name} (budget {budget:g} s) ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            fn(ctx, _Clock(budget), result)
        except StageTimeout as e:
            result.status = "timeout"
            result.note = (result.note + "; " if result.note else "") + f"cut at its budget of {budget:g} s"
            result.output_tail = e.output[-LOG_TAIL:]
        except Exception as e:  # noqa: BLE001 - one broken stage must not stop the others
            result.status = "failed"
            result.note = (result.note + "; " if result.note else "") + f"{type(e).__name__}: {e}"
        result.wall_s = round(time.monotonic() - t0, 2)
        print(f"[gpucheck] {name}: {result.status} in {result.wall_s:.1f} s"
              + (f" ({result.note})" if result.note else ""), file=sys.stderr, flush=True)
        results.append(result)
        ctx.data.setdefault("stages", []).append(result)
    return results


# The environment probe runs in a child: importing torch and initialising CUDA is
# where a broken driver hangs, and the parent must stay free to keep the budget.
_ENV_PROBE = r"""
import importlib, importlib.util, json, os, pkgutil, platform, shutil, subprocess, sys
info = {"python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "nvcc": shutil.which("nvcc"), "ninja": shutil.which("ninja"),
        # What the other stages need: a missing one explains a failed or skipped stage.
        "packages": {m: importlib.util.find_spec(m) is not None
                     for m in ("pytest", "xdist", "matplotlib", "tqdm", "peft", "sklearn", "triton")}}
import torch
info["torch"] = torch.__version__
info["cuda_runtime"] = torch.version.cuda
info["cuda_available"] = torch.cuda.is_available()
try:
    # svdkernels first, as a user imports it: the import must not load triton (so that
    # TRITON_INTERPRET can still be set), and the ops must register on this torch.
    import svdkernels, svdkernels.ops
    info["svdkernels_loaded_triton"] = "triton" in sys.modules
    # Some op modules register on first use of their layer (lowrank_adam_step): import them all.
    for m in pkgutil.iter_modules(svdkernels.ops.__path__):
        importlib.import_module(f"svdkernels.ops.{m.name}")
    info["svdkernels_import"] = "ok"
    info["ops"] = sorted(n for n in dir(torch.ops.svdkernels) if not n.startswith("_") and n != "name")
    info["ops_missing"] = [op for op in OPS if op not in info["ops"]]
    try:
        import svdkernels._C
        info["extension"] = "built"
    except ImportError as e:
        info["extension"] = f"not built ({e})"
except Exception as e:
    info["svdkernels_import"] = f"{type(e).__name__}: {e}"
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["triton"] = None
    info["triton_error"] = f"{type(e).__name__}: {e}"
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                gpu_memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
if shutil.which("nvidia-smi"):
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        info["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    except Exception:
        info["driver"] = None
print("GPUCHECK-ENV " + json.dumps(info))
"""


def _stage_environment(ctx: Context, clock: _Clock, result: StageResult) -> None:
    code = f"OPS = {OPS!r}\n" + _ENV_PROBE
    cmd = [ctx.python, "-c", code]
    result.commands.append(f"{ctx.python} -c <environment probe>")
    done = call(ctx, clock, cmd, env=ctx.env(interpret=ctx.dry_run), label="environment probe")
    result.returncode = done.returncode
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("GPUCHECK-ENV ")), None)
    if done.returncode != 0 or line is None:
        result.status = "failed"
        result.note = "the probe failed"
        result.output_tail = done.stdout[-LOG_TAIL:]
        return
    info = json.loads(line.removeprefix("GPUCHECK-ENV "))
    ctx.data["environment"] = info
    problems = []
    if info.get("svdkernels_import") != "ok":
        problems.append(f"import svdkernels: {info.get('svdkernels_import')}")
    elif info.get("ops_missing"):
        problems.append(f"ops not registered: {', '.join(info['ops_missing'])}")
    if not ctx.dry_run and not info.get("cuda_available"):
        problems.append("no CUDA device (use --dry-run on a CPU machine)")
    if info.get("svdkernels_loaded_triton"):
        problems.append("import svdkernels imported triton (TRITON_INTERPRET could no longer be set)")
    if info.get("triton") is None:
        problems.append(f"triton unavailable: {info.get('triton_error')}")
    if not info.get("packages", {}).get("pytest"):
        problems.append("pytest is not installed: the kernel tests cannot run")
    if problems:
        result.status = "failed"
        result.note = "; ".join(problems)
    gpu = info.get("gpu") or "no GPU"
    summary = (f"{gpu}, sm {info.get('capability', '-')}, {info.get('sm_count', '-')} SMs, driver "
               f"{info.get('driver') or '-'}, CUDA {info.get('cuda_runtime') or '-'}, torch {info['torch']}, "
               f"triton {info.get('triton') or '-'}")
    print(f"[gpucheck] {summary}", file=sys.stderr, flush=True)
    if not result.note:
        result.note = summary


def _gpu_missing(ctx: Context, result: StageResult) -> bool:
    """Skip a GPU stage (outside the dry run) when the environment found no CUDA device."""
    env = ctx.data.get("environment")
    if ctx.dry_run or env is None or env.get("cuda_available"):
        return False
    result.status = "skipped"
    result.note = "no CUDA device"
    return True


def _stage_build(ctx: Context, clock: _Clock, result: StageResult) -> None:
    if ctx.dry_run:
        # Compiling takes minutes on a 2-core CI machine; the dry run only probes.
        have = [tool for tool in ("ninja", "c++", "nvcc") if shutil.which(tool)]
        result.status = "skipped"
        result.note = f"dry run: build not attempted (toolchain found: {', '.join(have) or 'none'})"
        return
    if not (ctx.repo / "setup.py").exists():
        result.status = "skipped"
        result.note = "no setup.py in the working tree"
        return
    env = ctx.env(interpret=False)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    # In place, with the machine's torch and no isolation: nothing is downloaded and
    # site-packages is left alone. The extension is optional: a failure is a note.
    cmd = [ctx.python, "setup.py", "-q", "build_ext", "--inplace"]
    result.commands.append(" ".join(cmd))
    done = call(ctx, clock, cmd, env=env, label="build")
    result.returncode = done.returncode
    probe = call(ctx, clock, [ctx.python, "-c", "import svdkernels._C"], env=env, label="extension import")
    if done.returncode == 0 and probe.returncode == 0:
        result.note = "svdkernels._C built in place"
    else:
        result.status = "skipped"
        result.note = "C++ extension not built (optional; the kernel tests do not need it)"
        result.output_tail = (done.stdout + probe.stdout)[-LOG_TAIL:]


_LINE = re.compile(r"(?P<nodeid>\S+\.py::\S+)\s+(?P<word>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
                   r"|(?P<word2>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(?P<nodeid2>\S+\.py::\S+)")
_OUTCOME = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
            "XFAIL": "xfailed", "XPASS": "xpassed"}


def family_of(test_file: str) -> str:
    """``tests/triton/test_rsvd_kernels.py`` and ``tests/ops/test_rsvd.py`` -> ``rsvd``."""
    return Path(test_file.split("::")[0]).stem.removeprefix("test_").removesuffix("_kernels")


def parse_pytest_lines(text: str) -> dict[str, str]:
    """``{nodeid: outcome}`` from ``pytest -v`` output (with or without xdist), the
    fallback when a cut run never wrote its junit XML. A test reported twice (a
    teardown error after a pass) keeps the worse outcome."""
    found: dict[str, str] = {}
    rank = {"passed": 0, "xfailed": 0, "skipped": 0, "xpassed": 1, "failed": 2, "error": 3}
    for m in _LINE.finditer(text):
        nodeid = m.group("nodeid") or m.group("nodeid2")
        outcome = _OUTCOME[m.group("word") or m.group("word2")]
        if nodeid not in found or rank[outcome] > rank[found[nodeid]]:
            found[nodeid] = outcome
    return found


def parse_junit(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """``({test id: outcome}, failures)`` from a pytest junit XML; each failure is
    ``{"test", "message"}`` with the message cut to 600 characters."""
    outcomes: dict[str, str] = {}
    failures: list[dict[str, str]] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        # classname "tests.triton.test_rsvd_kernels" -> file "tests/triton/test_rsvd_kernels.py"
        test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = (child.get("message") or child.text or "").strip()
                failures.append({"test": test, "message": message[:600]})
            elif child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        outcomes[test] = outcome
    return outcomes, failures


def per_family(outcomes: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Counts of each outcome per op family (``family_of`` the test's file)."""
    counts: dict[str, dict[str, int]] = {}
    for test, outcome in outcomes.items():
        fam = counts.setdefault(family_of(test.split("::")[0]),
                                dict.fromkeys(("passed", "failed", "error", "skipped", "xfailed", "xpassed"), 0))
        fam[outcome] += 1
    return dict(sorted(counts.items()))


def _xdist_workers(ctx: Context) -> int:
    """pytest-xdist workers for the GPU run: kernel compilation is CPU-bound and the
    lent machines have 16 cores; 0 where xdist is not installed or in the dry run."""
    if ctx.dry_run:
        return 0
    import importlib.util

    if importlib.util.find_spec("xdist") is None:
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // 2))


def _pytest(ctx: Context, clock: _Clock, result: StageResult, paths: Sequence[str], extra: Sequence[str],
            key: str) -> None:
    junit = ctx.work / f"{key}.xml"
    cmd = [ctx.python, "-m", "pytest", *paths, "-v", "-p", "no:cacheprovider", f"--maxfail={MAX_FAIL}",
           f"--junitxml={junit}", *extra]
    result.commands.append(" ".join(cmd))
    text = ""
    cut = False
    try:
        done = call(ctx, clock, cmd, env=ctx.env(interpret=ctx.dry_run), label="pytest")
        text = done.stdout
        result.returncode = done.returncode
    except StageTimeout as e:
        text, cut = e.output, True
    if junit.exists() and not cut:
        outcomes, failures = parse_junit(junit)
    else:
        outcomes = parse_pytest_lines(text)
        failures = [{"test": t, "message": "see gpucheck.log"} for t, o in outcomes.items() if o in ("failed", "error")]
    families = per_family(outcomes)
    totals = {k: sum(f[k] for f in families.values()) for k in ("passed", "failed", "error", "skipped",
                                                                 "xfailed", "xpassed")}
    ctx.data[key] = {"families": families, "totals": totals, "failures": failures[:50],
                     "complete": not cut, "command": " ".join(cmd)}
    if cut:
        raise StageTimeout(text)
    bad = totals["failed"] + totals["error"]
    if result.returncode not in (0, None) and not bad:
        # pytest failed without a failing test: a collection or usage error.
        result.status = "failed"
        result.note = f"pytest exit {result.returncode} with no failing test (collection error?)"
        result.output_tail = text[-LOG_TAIL:]
    elif bad:
        result.status = "failed"
        result.note = f"{totals['passed']} passed, {bad} failed"
    else:
        result.note = f"{totals['passed']} passed, {totals['skipped']} skipped"
    if not outcomes:
        result.status = "failed"
        result.note = "no test ran"
        result.output_tail = text[-LOG_TAIL:]


def _stage_kernel_tests(ctx: Context, clock: _Clock, result: StageResult) -> None:
    if _gpu_missing(ctx, result):
        return
    # The sm_80/sm_90 compile check is its own (opt-in) stage: on a GPU the tests
    # compile every kernel they run anyway, and it is the slowest file.
    extra = ["--ignore=tests/triton/test_compile.py"]
    if ctx.dry_run:
        extra += ["-k", DRY_RUN_K]
    workers = _xdist_workers(ctx)
    if workers:
        extra += ["-n", str(workers)]
    _pytest(ctx, clock, result, KERNEL_TEST_PATHS, extra, "kernel_tests")


def _stage_compile(ctx: Context, clock: _Clock, result: StageResult) -> None:
    extra = ["-k", "tensor_cores or compile_cases"] if ctx.dry_run else []
    _pytest(ctx, clock, result, ["tests/triton/test_compile.py"], extra, "compile")


def _stage_bench(ctx: Context, clock: _Clock, result: StageResult) -> None:
    if _gpu_missing(ctx, result):
        return
    families = list(ctx.data.get("bench_families") or (DRY_RUN_BENCH_FAMILIES if ctx.dry_run else BENCH_FAMILIES))
    device = "cpu" if ctx.dry_run else "cuda"
    status: dict[str, dict[str, Any]] = {}
    merged: dict[str, Any] = {}
    ctx.data["bench"] = {"status": status, "doc": merged}
    for i, family in enumerate(families):
        out = ctx.work / f"bench-{family}"
        cmd = [ctx.python, "-m", "svdkernels", "bench", "--quick", "--device", device, "--only", family,
               "--out", str(out)]
        if ctx.dry_run:
            cmd += ["--repeats", "1"]
        result.commands.append(" ".join(cmd))
        t0 = time.monotonic()
        try:
            done = call(ctx, clock, cmd, env=ctx.env(interpret=False), label=f"bench {family}")
        except StageTimeout as e:
            status[family] = {"status": "timeout", "wall_s": round(time.monotonic() - t0, 2)}
            for rest in families[i + 1:]:
                status[rest] = {"status": "skipped", "wall_s": 0.0, "note": "stage budget spent"}
            raise StageTimeout(e.output) from None
        ok = done.returncode == 0 and (out / "bench.json").exists()
        status[family] = {"status": "ok" if ok else "failed", "wall_s": round(time.monotonic() - t0, 2)}
        if not ok:
            status[family]["output_tail"] = done.stdout[-LOG_TAIL:]
            continue
        doc = json.loads((out / "bench.json").read_text())
        if not merged:
            merged.update({k: v for k, v in doc.items() if k != "families"}, families={})
        merged["families"].update(doc.get("families", {}))
        png = out / "bench.png"
        if png.exists():
            status[family]["png"] = str(png)
    failed = [f for f, s in status.items() if s["status"] != "ok"]
    if failed:
        result.status = "failed"
        result.note = f"failed: {', '.join(failed)}"
    else:
        result.note = f"{len(families)} families: {', '.join(families)}"


# --------------------------------------------------------------------------- report


def roofline_fractions(bench_doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One entry per roofline row of a bench.json: ``fraction`` = limit / measured
    (1.0 would be at the hardware's limit)."""
    rows = []
    for family, items in (bench_doc.get("families") or {}).items():
        for row in items:
            if row.get("kind") != "roofline":
                continue
            extra = row.get("extra") or {}
            ratio = extra.get("measured_over_limit")
            limit = row.get("time_ms")
            rows.append({
                "family": family,
                "workload": row.get("workload", ""),
                "method": row.get("method", ""),
                "limit_ms": limit,
                "measured_ms": limit * ratio if limit is not None and ratio is not None else None,
                "fraction": 1.0 / ratio if ratio else None,
                "bound": extra.get("bound"),
            })
    return rows


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Mapping[str, Any]) -> str:
    """report.md: the machine, the stages, pass/fail per family, the bench tables and
    the fraction of the roofline per kernel."""
    env = doc.get("environment") or {}
    lines = [f"# svdkernels GPU check{' (dry run on the CPU)' if doc.get('dry_run') else ''}", ""]
    lines.append(f"- result: **{'PASS' if doc.get('ok') else 'FAIL'}** in {doc.get('wall_s', 0):.0f} s "
                 f"(started {doc.get('started', '-')})")
    lines.append(f"- device: {env.get('gpu') or 'no GPU'}"
                 + (f", sm {env['capability']}, {env.get('sm_count')} SMs, {env.get('gpu_memory_gib')} GiB"
                    if env.get("gpu") else ""))
    lines.append(f"- driver {env.get('driver') or '-'}, CUDA {env.get('cuda_runtime') or '-'}, "
                 f"torch {env.get('torch', '-')}, triton {env.get('triton') or '-'}, "
                 f"python {env.get('python', '-')}, C++ extension {env.get('extension', '-')}")
    missing = [m for m, present in (env.get("packages") or {}).items() if not present]
    if missing:
        lines.append(f"- not installed: {', '.join(missing)}")
    lines += ["", "## Stages", "", "| stage | status | time s | budget s | note |", "| --- | --- | --- | --- | --- |"]
    for s in doc.get("stages", []):
        lines.append(f"| {s['name']} | {s['status']} | {s['wall_s']:.1f} | {s['budget_s']:g} | {_cell(s['note'])} |")
    for key, title in (("kernel_tests", "Kernel tests"), ("compile", "Compile check (sm_80, sm_90)")):
        tests = doc.get(key)
        if not tests:
            continue
        lines += ["", f"## {title}", ""]
        if not tests.get("complete", True):
            lines.append("Cut by the budget: families after the last one listed did not run.\n")
        lines += ["| family | result | passed | failed | errors | skipped |", "| --- | --- | --- | --- | --- | --- |"]
        for fam, c in tests.get("families", {}).items():
            verdict = "FAIL" if c["failed"] or c["error"] else "pass"
            lines.append(f"| {fam} | {verdict} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} |")
        if tests.get("failures"):
            lines += ["", "Failures (first 20):", ""]
            lines += [f"- `{f['test']}`: {_cell(f['message'][:200])}" for f in tests["failures"][:20]]
    bench = doc.get("bench") or {}
    if bench.get("status"):
        lines += ["", "## Bench", ""]
        lines.append(", ".join(f"{f}: {s['status']} ({s['wall_s']:.0f} s)" for f, s in bench["status"].items()))
        roof = bench.get("roofline") or []
        if roof:
            lines += ["", "### Fraction of the roofline (limit / measured; 1 = at the hardware limit)", "",
                      "| family | workload | roofline | ours ms | limit ms | fraction | bound |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for r in roof:
                lines.append(f"| {r['family']} | {_cell(r['workload'])} | {_cell(r['method'])} | {_fmt(r['measured_ms'])} | "
                             f"{_fmt(r['limit_ms'])} | {_fmt(r['fraction'], 2)} | {r['bound'] or '-'} |")
        peaks = bench.get("peaks") or {}
        if peaks:
            flops = ", ".join(f"{d} {f / 1e12:.3g} TFLOP/s" for d, f in (peaks.get("flops") or {}).items())
            lines += ["", f"Peaks ({peaks.get('source')}): {flops}, {peaks.get('bandwidth', 0) / 1e9:.0f} GB/s."]
        for family, rows in (bench.get("rows") or {}).items():
            lines += ["", f"### {family}", "", "| workload | method | time ms | vs ours | accuracy | note |",
                      "| --- | --- | --- | --- | --- | --- |"]
            prev = None
            for r in rows:
                errors = ", ".join(f"{k} {_fmt(v)}" for k, v in (r.get("errors") or {}).items())
                workload = r.get("workload", "") if r.get("workload") != prev else ""
                prev = r.get("workload")
                lines.append(f"| {_cell(workload)} | {_cell(r.get('method', ''))} | {_fmt(r.get('time_ms'))} | "
                             f"{_fmt(r.get('vs_ours'), 2)} | {_cell(errors) or '-'} | {_cell(r.get('note', ''))} |")
        if bench.get("png"):
            lines += ["", "![bench](bench.png)"]
    lines += ["", f"Files: {', '.join(doc.get('files', []))}.", ""]
    return "\n".join(lines)


def _stage_report(ctx: Context, clock: _Clock, result: StageResult) -> None:
    bench = ctx.data.get("bench") or {}
    merged = bench.get("doc") or {}
    files = ["gpucheck.json", "report.md", "gpucheck.log"]
    bench_out: dict[str, Any] = {"status": bench.get("status", {})}
    if merged.get("families"):
        (ctx.out_dir / "bench.json").write_text(json.dumps(merged, indent=2) + "\n")
        files.append("bench.json")
        bench_out.update(rows=merged["families"], roofline=roofline_fractions(merged),
                         peaks=merged.get("peaks"), machine=merged.get("machine"))
        if _plot(ctx, clock, merged):
            files.append("bench.png")
            bench_out["png"] = "bench.png"
    ctx.data["bench_report"] = bench_out
    ctx.data["files"] = sorted(files)
    result.note = f"{len(files)} files"


def _plot(ctx: Context, clock: _Clock, merged: Mapping[str, Any]) -> bool:
    """bench.png of every benched family: one family's own PNG when only one ran,
    else redrawn by the bench's own plotter from the merged rows (in a child, which
    imports torch and matplotlib)."""
    pngs = [s["png"] for s in (ctx.data.get("bench") or {}).get("status", {}).values() if s.get("png")]
    if len(pngs) == 1:
        shutil.copyfile(pngs[0], ctx.out_dir / "bench.png")
        return True
    if not pngs:
        return False
    src = ctx.work / "merged-bench.json"
    src.write_text(json.dumps(merged))
    code = ("import json, sys\nfrom pathlib import Path\n"
            "from svdkernels.bench.report import write_plot\nfrom svdkernels.bench.rows import Row\n"
            "doc = json.loads(Path(sys.argv[1]).read_text())\n"
            "rows = {f: [Row(**r) for r in rs] for f, rs in doc['families'].items()}\n"
            "sys.exit(0 if write_plot(Path(sys.argv[2]), rows) else 1)\n")
    try:
        done = call(ctx, clock, [ctx.python, "-c", code, str(src), str(ctx.out_dir / "bench.png")],
                    env=ctx.env(interpret=False), label="plot")
    except StageTimeout:
        return False
    return done.returncode == 0 and (ctx.out_dir / "bench.png").exists()


_BODIES: dict[str, StageFn] = {
    "environment": _stage_environment,
    "build": _stage_build,
    "kernel_tests": _stage_kernel_tests,
    "bench": _stage_bench,
    "compile": _stage_compile,
    "report": _stage_report,
}


# --------------------------------------------------------------------------- driver


def _check_out_dir(out_dir: Path) -> Path:
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a path, got {type(out_dir).__name__}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir: {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir: cannot create {out_dir}: {e}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir: {out_dir} is not writable")
    return out_dir


def _repo_root() -> Path:
    """The working tree this module runs from (the tests live beside the package)."""
    return Path(__file__).resolve().parent.parent


def run_check(
    out_dir: Path,
    *,
    dry_run: bool = False,
    stages: Sequence[str] | None = None,
    budgets: Mapping[str, float] | None = None,
    bench_families: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the check and write its files to ``out_dir``; return the JSON document.

    ``stages``: names from :data:`STAGES` (default :data:`DEFAULT_STAGES`; ``report``
    always runs last). ``budgets``: seconds per stage name, over the defaults
    (:data:`DEFAULT_BUDGETS`, or :data:`DRY_RUN_BUDGETS` with ``dry_run``).
    ``bench_families``: what the bench stage runs (default :data:`BENCH_FAMILIES`,
    one cheap family in the dry run).
    """
    out_dir = _check_out_dir(out_dir)
    chosen = list(DEFAULT_STAGES if stages is None else stages)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown stage {', '.join(map(repr, unknown))}; expected some of {', '.join(STAGES)}")
    if "report" not in chosen:
        chosen.append("report")
    chosen = [s for s in STAGES if s in chosen]  # fixed order: report last
    table = dict(DRY_RUN_BUDGETS if dry_run else DEFAULT_BUDGETS)
    for name, seconds in (budgets or {}).items():
        if name not in STAGES:
            raise ValueError(f"budgets: unknown stage {name!r}; expected one of {', '.join(STAGES)}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"budgets: seconds for {name!r} must be a number, got {type(seconds).__name__}")
        if not seconds > 0:
            raise ValueError(f"budgets: seconds for {name!r} must be positive, got {seconds}")
        table[name] = float(seconds)
    if bench_families is not None and (isinstance(bench_families, str) or not bench_families):
        raise ValueError(f"bench_families: expected a non-empty list of family names, got {bench_families!r}")
    repo = _repo_root()
    if not (repo / "tests" / "triton").is_dir():
        raise ValueError(f"svdkernels is not running from a working tree with its tests ({repo}): "
                         "run from the repository (PYTHONPATH=<repo>)")

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpucheck-") as work:
        ctx = Context(repo=repo, out_dir=out_dir, work=Path(work), dry_run=dry_run)
        if bench_families:
            ctx.data["bench_families"] = list(bench_families)
        results = run_stages(ctx, [(name, table[name], _BODIES[name]) for name in chosen])
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "dry_run": dry_run,
            "started": started,
            "wall_s": round(time.monotonic() - t0, 2),
            # Skipped is fine (the optional build); a stage that failed or was cut is not.
            "ok": all(r.status in ("ok", "skipped") for r in results),
            "environment": ctx.data.get("environment", {}),
            "stages": [asdict(r) for r in results],
            "kernel_tests": ctx.data.get("kernel_tests"),
            "compile": ctx.data.get("compile"),
            "bench": ctx.data.get("bench_report", {}),
            "files": ctx.data.get("files", ["gpucheck.json", "gpucheck.log", "report.md"]),
        }
        (out_dir / "gpucheck.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        (out_dir / "report.md").write_text(render_markdown(doc))
        (out_dir / "gpucheck.log").write_text("".join(ctx.log))
    return doc


def _budget_arg(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected STAGE=SECONDS, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds must be a number, got {value!r}") from None


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``gpucheck`` arguments to ``parser`` (standard library only: ``--help`` stays instant)."""
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help=f"output directory: gpucheck.json, report.md, bench.json, bench.png, gpucheck.log "
                             f"(at most {MAX_FILES} files)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every stage on the CPU (interpreter, a small test subset, one bench family)")
    parser.add_argument("--stages", nargs="+", metavar="STAGE",
                        help=f"stages to run, of {', '.join(STAGES)} (default: {' '.join(DEFAULT_STAGES)}; "
                             "report always runs)")
    parser.add_argument("--budget", type=_budget_arg, action="append", default=[], metavar="STAGE=SECONDS",
                        help="override a stage's time budget (repeatable); defaults: "
                             + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_BUDGETS.items()))
    parser.add_argument("--bench-families", nargs="+", metavar="FAMILY",
                        help=f"bench families (default: {' '.join(BENCH_FAMILIES)})")


def run_cli(args: argparse.Namespace, error: Callable[[str], Any]) -> int:
    """Run the parsed ``gpucheck`` command; bad arguments go to ``error`` (argparse's
    ``parser.error``). Exit status 0 when every stage passed, 1 otherwise."""
    try:
        doc = run_check(args.out, dry_run=args.dry_run, stages=args.stages, budgets=dict(args.budget),
                        bench_families=args.bench_families)
    except (ValueError, TypeError) as e:
        error(str(e))
        return 2
    print(f"gpucheck: {'PASS' if doc['ok'] else 'FAIL'} in {doc['wall_s']:.0f} s; "
          f"wrote {', '.join(str(Path(args.out) / f) for f in doc['files'])}")
    return 0 if doc["ok"] else 1
