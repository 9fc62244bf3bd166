"""Stages under time budgets: each runs its commands in child processes with what is
left of its budget; a stage that overruns is killed with its children and reported."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("ok", "failed", "timeout", "skipped")
LOG_TAIL = 4000  # characters of a stage's output kept in the JSON


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


class Clock:
    """The deadline of the running stage: every child gets what is left of it."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()


def call(ctx: Context, clock: Clock, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
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


StageFn = Callable[[Context, Clock, StageResult], None]
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
            fn(ctx, Clock(budget), result)
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

