"""What the check reads and writes: pytest outcomes per op family (junit XML, or the
``-v`` stream of a run cut by its budget), roofline fractions from bench.json, report.md."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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

