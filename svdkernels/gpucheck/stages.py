"""The stage bodies: environment, build, kernel_tests, bench, compile, report (the
files of the bench); :data:`BODIES` maps each stage name to its body."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from svdkernels.gpucheck.report import parse_junit, parse_pytest_lines, per_family, roofline_fractions
from svdkernels.gpucheck.runner import LOG_TAIL, Clock, Context, StageFn, StageResult, StageTimeout, call

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


def _stage_environment(ctx: Context, clock: Clock, result: StageResult) -> None:
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


def _stage_build(ctx: Context, clock: Clock, result: StageResult) -> None:
    if _gpu_missing(ctx, result):
        return
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
    try:
        done = call(ctx, clock, cmd, env=env, label="build")
        probe = call(ctx, clock, [ctx.python, "-c", "import svdkernels._C"], env=env, label="extension import")
    except StageTimeout as e:
        # Optional: a build cut by its budget leaves the check passing, with a note.
        result.status = "skipped"
        result.note = f"C++ extension build cut at its budget of {result.budget_s:g} s (optional)"
        result.output_tail = e.output[-LOG_TAIL:]
        return
    result.returncode = done.returncode
    if done.returncode == 0 and probe.returncode == 0:
        result.note = "svdkernels._C built in place"
    else:
        result.status = "skipped"
        result.note = "C++ extension not built (optional; the kernel tests do not need it)"
        result.output_tail = (done.stdout + probe.stdout)[-LOG_TAIL:]


def _xdist_workers(ctx: Context) -> int:
    """pytest-xdist workers for the GPU run: kernel compilation is CPU-bound and the
    lent machines have 16 cores; 0 where xdist is not installed or in the dry run."""
    if ctx.dry_run:
        return 0
    import importlib.util

    if importlib.util.find_spec("xdist") is None:
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // 2))


def _pytest(ctx: Context, clock: Clock, result: StageResult, paths: Sequence[str], extra: Sequence[str],
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


def _stage_kernel_tests(ctx: Context, clock: Clock, result: StageResult) -> None:
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


def _stage_compile(ctx: Context, clock: Clock, result: StageResult) -> None:
    # Dry run: the tests that build nothing (the full check compiles ~100 kernels).
    extra = ["-k", "every_kernel_family_has_compile_cases or names_every_problem"] if ctx.dry_run else []
    _pytest(ctx, clock, result, ["tests/triton/test_compile.py"], extra, "compile")


def _stage_bench(ctx: Context, clock: Clock, result: StageResult) -> None:
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
        # A fair share of what is left: one slow family is cut without starving the
        # ones after it, and a fast one leaves its unused time to them.
        share = Clock(clock.left() / (len(families) - i))
        try:
            done = call(ctx, share, cmd, env=ctx.env(interpret=False), label=f"bench {family}")
        except StageTimeout as e:
            status[family] = {"status": "timeout", "wall_s": round(time.monotonic() - t0, 2),
                              "output_tail": e.output[-LOG_TAIL:]}
            continue
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
    cut = [f for f, s in status.items() if s["status"] == "timeout"]
    failed = [f for f, s in status.items() if s["status"] == "failed"]
    notes = ([f"cut at their share of the budget: {', '.join(cut)}"] if cut else []) + (
        [f"failed: {', '.join(failed)}"] if failed else [])
    if notes:
        result.status = "timeout" if cut else "failed"
        result.note = "; ".join(notes)
    else:
        result.note = f"{len(families)} famil{'y' if len(families) == 1 else 'ies'}: {', '.join(families)}"


def _stage_report(ctx: Context, clock: Clock, result: StageResult) -> None:
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


def _plot(ctx: Context, clock: Clock, merged: Mapping[str, Any]) -> bool:
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


BODIES: dict[str, StageFn] = {
    "environment": _stage_environment,
    "build": _stage_build,
    "kernel_tests": _stage_kernel_tests,
    "bench": _stage_bench,
    "compile": _stage_compile,
    "report": _stage_report,
}

