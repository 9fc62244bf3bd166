"""The driver: :func:`run_check` (the Python API), :func:`configure` and :func:`run_cli`
(``python -m svdkernels gpucheck``)."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from svdkernels.gpucheck.report import render_markdown
from svdkernels.gpucheck.runner import Context, run_stages
from svdkernels.gpucheck.stages import BENCH_FAMILIES, BODIES

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
    return Path(__file__).resolve().parents[2]  # svdkernels/gpucheck/check.py -> the tree


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
        results = run_stages(ctx, [(name, table[name], BODIES[name]) for name in chosen])
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
