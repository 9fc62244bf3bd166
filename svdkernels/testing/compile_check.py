"""Compile Triton kernels for real GPUs without one, and check what ptxas says.

Level 3 of the verification plan (``DESIGN.md``, "Verifying kernels without a
GPU"): ``triton.compile`` builds PTX for a ``GPUTarget("cuda", cc, 32)`` on any
machine; ``ptxas -v`` (the one shipped with triton, the one triton itself uses
for that cc, with triton's register-allocator flag) then reports registers and
spills. :func:`check_report` fails a kernel that spills, needs more shared memory
than one block may have, or whose ``tl.dot`` misses the tensor cores (``mma.sync``
on sm_80; ``wgmma`` on sm_90, assembled for ``sm_90a``, the variant that has it).

Under ``TRITON_INTERPRET=1``: ``@triton.jit`` reads the variable when it decorates,
so with it set every kernel -- ours and triton's own jit helpers such as
``tl.philox`` -- is an ``InterpretedFunction``, which the compiler cannot lower,
and flipping ``triton.knobs`` afterwards rebuilds none of them. So in an
interpreted process kernels are compiled in a child Python started without the
variable, which imports each kernel again by module and name (kernels must be
module-level). :func:`compile_all` always works that way, spreading many builds
over a few children, which also makes a cold compile of many configs faster.

Typical use, for a kernel module that yields :class:`CompileCase` s::

    for case, report in compile_all(list(module.compile_cases())):
        print(report.summary())
        check_report(report, expects_tensor_cores=case.expects_tensor_cores)
"""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import import_module

from svdkernels.triton.common import CompileCase

# Largest dynamic shared memory one block may opt in to (CUDA programming guide,
# "Technical specifications per compute capability").
SHARED_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class CompileReport:
    """What one kernel compiled for one compute capability looks like to ptxas."""

    cc: int
    name: str
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared_bytes: int  # per block: the dynamic shared memory triton requests, plus static
    has_mma: bool  # mma.sync in the PTX (Ampere-style tensor cores)
    has_wgmma: bool  # wgmma.mma_async in the PTX (Hopper warpgroup tensor cores)
    ptx: str = field(repr=False)

    def summary(self) -> str:
        """One line: name, sm, registers, shared memory, spills, tensor-core instructions."""
        tc = "wgmma" if self.has_wgmma else "mma" if self.has_mma else "no tensor cores"
        return (
            f"{self.name} sm_{self.cc}: {self.registers} regs, {self.shared_bytes} B smem, "
            f"spills {self.spill_stores}/{self.spill_loads} B, {tc}"
        )


@dataclass(frozen=True)
class _Request:
    """A build that pickles: the kernel by module and name."""

    module: str
    name: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    cc: int
    options: dict[str, int]
    divisible_by_16: tuple[str, ...]


def _kernel(fn: object) -> object:
    """The JITFunction (or InterpretedFunction) inside autotune/heuristics wrappers."""
    while hasattr(getattr(fn, "fn", None), "fn"):  # a wrapper's .fn is the kernel object
        fn = fn.fn  # type: ignore[attr-defined]
    return fn


def _request(fn: object, signature: dict[str, str], constexprs: dict[str, object], cc: int,
             options: dict[str, int], divisible_by_16: Sequence[str]) -> _Request:
    python_fn = _kernel(fn).fn  # type: ignore[attr-defined]
    return _Request(python_fn.__module__, python_fn.__name__, signature, constexprs, cc,
                    dict(options), tuple(divisible_by_16))


def _ptxas_info(ptx: str, cc: int) -> str:
    """``ptxas -v`` output for ``ptx``, assembled as triton assembles it for this cc."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(cc).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
               "-o", os.path.join(tmp, "kernel.cubin")]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}:\n{done.stderr}")
    return done.stderr


def _compile_here(req: _Request) -> CompileReport:
    """Build ``req`` in this process (which must not be interpreting)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(getattr(import_module(req.module), req.name))
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in req.divisible_by_16}
    kernel = triton.compile(
        ASTSource(fn=fn, signature=req.signature, constexprs=req.constexprs, attrs=attrs),
        target=GPUTarget("cuda", req.cc, 32),
        options=req.options,
    )
    ptx = kernel.asm["ptx"]
    info = _ptxas_info(ptx, req.cc)

    def number(pattern: str) -> int:
        found = re.search(pattern, info)
        return int(found.group(1)) if found else 0

    return CompileReport(
        cc=req.cc,
        name=kernel.metadata.name,
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        shared_bytes=int(kernel.metadata.shared) + number(r"(\d+) bytes smem"),
        has_mma="mma.sync" in ptx,
        has_wgmma="wgmma.mma_async" in ptx,
        ptx=ptx,
    )


def _interpreting(fn: object) -> bool:
    from triton.runtime import JITFunction

    return not isinstance(_kernel(fn), JITFunction)


def compile_kernel(
    fn: object,
    signature: dict[str, str],
    constexprs: dict[str, object],
    *,
    cc: int,
    num_warps: int,
    num_stages: int,
    maxnreg: int | None = None,
    divisible_by_16: Sequence[str] = (),
) -> CompileReport:
    """Compile ``fn`` (a module-level ``@triton.jit`` kernel) for compute capability ``cc``.

    Works with or without ``TRITON_INTERPRET=1`` in this process (see the module
    docstring). A kernel that does not build raises the compiler's error (in a
    child process: RuntimeError naming the kernel, with the child's traceback).
    """
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    req = _request(fn, signature, constexprs, cc, options, divisible_by_16)
    if _interpreting(fn):
        return _compile_in_children([req], jobs=1)[0]
    return _compile_here(req)


def compile_all(
    cases: Sequence[CompileCase], ccs: Sequence[int] = (80, 90), *, jobs: int | None = None
) -> list[tuple[CompileCase, CompileReport]]:
    """Every case built for every cc, over ``jobs`` child processes (default: the
    CPU count); pairs in the order case-major, cc-minor."""
    pairs = [(case, cc) for case in cases for cc in ccs]
    requests = [
        _request(case.kernel, case.signature, case.constexprs, cc, case.options, case.divisible_by_16)
        for case, cc in pairs
    ]
    reports = _compile_in_children(requests, jobs=jobs)
    return [(case, report) for (case, _), report in zip(pairs, reports)]


def reports_by_case(cases: Sequence[CompileCase], ccs: Sequence[int] = (80, 90)) -> dict[tuple[str, int], CompileReport]:
    """:func:`compile_all` keyed by ``(case.id, cc)``: what each kernel test module's
    module-scoped ``reports`` fixture returns (one batch over all CPUs)."""
    return {(case.id, report.cc): report for case, report in compile_all(cases, ccs)}


def _compile_in_children(requests: Sequence[_Request], *, jobs: int | None) -> list[CompileReport]:
    """Build ``requests`` in child Pythons without ``TRITON_INTERPRET``; reports in order."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(requests)))
    chunks = [list(range(i, len(requests), jobs)) for i in range(jobs)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The child must import what this process imports (pytest may have put the
    # checkout on sys.path without installing it).
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
    reports: list[CompileReport | None] = [None] * len(requests)
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        for n, chunk in enumerate(chunks):
            src, dst = os.path.join(tmp, f"in{n}.pkl"), os.path.join(tmp, f"out{n}.pkl")
            with open(src, "wb") as f:
                pickle.dump([requests[i] for i in chunk], f)
            # Files, not pipes: nothing the compiler prints can garble the results.
            child = subprocess.Popen([sys.executable, "-m", __name__, src, dst], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            children.append((chunk, child, dst))
        for chunk, child, dst in children:
            err = child.communicate()[1].decode(errors="replace")
            if child.returncode != 0:
                raise RuntimeError(f"compile worker failed (exit {child.returncode}):\n{err[-4000:]}")
            with open(dst, "rb") as f:
                results = pickle.load(f)
            for i, result in zip(chunk, results):
                if isinstance(result, str):
                    req = requests[i]
                    raise RuntimeError(
                        f"{req.module}.{req.name} failed to compile for sm_{req.cc}:\n{result}"
                    )
                reports[i] = result
    return reports  # type: ignore[return-value]


def _worker(src: str, dst: str) -> None:
    """Child process: build the requests pickled in ``src``; pickle reports (or errors) to ``dst``."""
    import traceback

    with open(src, "rb") as f:
        requests = pickle.load(f)
    results: list[CompileReport | str] = []
    for req in requests:
        try:
            results.append(_compile_here(req))
        except Exception:  # handed to the parent, which raises naming the kernel
            results.append(traceback.format_exc())
    with open(dst, "wb") as f:
        pickle.dump(results, f)


def check_report(report: CompileReport, *, expects_tensor_cores: bool) -> None:
    """Raise AssertionError listing every problem: spills, too much shared memory,
    tensor-core instructions missing where the kernel's inner loop is a ``tl.dot``."""
    problems = []
    if report.spill_stores or report.spill_loads:
        problems.append(
            f"spills {report.spill_stores} B stores / {report.spill_loads} B loads at "
            f"{report.registers} registers: use smaller tiles or more warps"
        )
    limit = SHARED_LIMIT_BYTES.get(report.cc)
    if limit is not None and report.shared_bytes > limit:
        problems.append(
            f"needs {report.shared_bytes} B shared memory, sm_{report.cc} allows {limit} B "
            f"per block: use fewer stages or smaller tiles"
        )
    if expects_tensor_cores:
        if report.cc >= 90 and not report.has_wgmma:
            problems.append("no wgmma in the PTX: the tl.dot misses Hopper's tensor cores")
        elif report.cc < 90 and not report.has_mma:
            problems.append("no mma.sync in the PTX: the tl.dot misses the tensor cores")
    if problems:
        raise AssertionError(f"{report.name} on sm_{report.cc}: " + "; ".join(problems))


if __name__ == "__main__":
    # Run the worker from the importable module rather than __main__, so the reports
    # it pickles are svdkernels.testing.compile_check.CompileReport objects.
    import_module("svdkernels.testing.compile_check")._worker(*sys.argv[1:3])
