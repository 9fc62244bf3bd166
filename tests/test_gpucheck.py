"""The GPU check (``scripts/gpu_check.sh``, ``python -m svdkernels gpucheck``), run for
real with ``--dry-run`` on the CPU: the files, the JSON schema and the markdown; and
its parts: budget enforcement, bad arguments, the pytest and bench parsers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from svdkernels import gpucheck
from svdkernels.gpucheck.stages import BODIES
from svdkernels.gpucheck import Context, call, run_stages

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
FAMILIES = {"rsvd", "kron_linear", "lowrank_quant", "lowrank_attention", "lowrank_adam_step"}


def _script(out: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd="/")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str], float]:
    # The whole script once, as a user runs it (from another directory), on the CPU.
    out = tmp_path_factory.mktemp("gpucheck") / "out"
    t0 = time.monotonic()
    done = _script(out, "--dry-run")
    return out, done, time.monotonic() - t0


def test_dry_run_passes_and_writes_the_files(dry_run):
    out, done, wall = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.json", "bench.png", "gpucheck.json", "gpucheck.log", "report.md"]
    assert len(files) <= gpucheck.MAX_FILES
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in done.stdout
    print(f"dry run: {wall:.1f} s")


def test_dry_run_json_schema(dry_run):
    out, _, _ = dry_run
    doc = json.loads((out / "gpucheck.json").read_text())
    assert doc["schema"] == gpucheck.SCHEMA and doc["dry_run"] is True and doc["ok"] is True
    assert sorted(doc["files"]) == sorted(p.name for p in out.iterdir())
    stages = {s["name"]: s for s in doc["stages"]}
    assert list(stages) == ["environment", "build", "kernel_tests", "bench", "report"]
    assert {s["status"] for s in stages.values()} <= {"ok", "skipped"}
    assert stages["build"]["status"] == "skipped"  # the dry run only probes the toolchain
    for s in stages.values():
        assert 0 <= s["wall_s"] <= s["budget_s"] + 10
    env = doc["environment"]
    assert env["svdkernels_import"] == "ok" and env["torch"] and env["triton"]
    assert env["svdkernels_loaded_triton"] is False and env["packages"]["pytest"] is True
    assert set(gpucheck.OPS) <= set(env["ops"])  # every op registered on this torch
    tests = doc["kernel_tests"]
    assert set(tests["families"]) >= FAMILIES and tests["complete"] is True
    for fam in FAMILIES:
        counts = tests["families"][fam]
        assert counts["passed"] > 0 and counts["failed"] == counts["error"] == 0, (fam, counts)
    assert tests["totals"]["passed"] == sum(f["passed"] for f in tests["families"].values())
    bench = doc["bench"]
    assert list(bench["status"]) == ["kron_linear"] and bench["status"]["kron_linear"]["status"] == "ok"
    rows = bench["rows"]["kron_linear"]
    assert any(r["kind"] == "ours" and r["time_ms"] > 0 for r in rows)
    assert bench["roofline"] and all(0 < r["fraction"] <= 1 and r["measured_ms"] > r["limit_ms"]
                                     for r in bench["roofline"])
    assert json.loads((out / "bench.json").read_text())["families"].keys() == {"kron_linear"}


def test_dry_run_markdown(dry_run):
    out, _, _ = dry_run
    md = (out / "report.md").read_text()
    assert md.startswith("# svdkernels GPU check (dry run on the CPU)")
    assert "**PASS**" in md
    for heading in ("## Stages", "## Kernel tests", "## Bench", "### Fraction of the roofline", "### kron_linear"):
        assert heading in md
    for fam in FAMILIES:
        assert f"| {fam} | pass |" in md
    assert "| kron_linear | N64 d256 fwd |" in md  # a roofline row
    assert "![bench](bench.png)" in md


def test_a_cut_stage_is_reported_and_the_next_runs(tmp_path):
    # A stage that overruns is killed with its own children; the next stage still runs.
    pid_file = tmp_path / "grandchild.pid"
    ctx = Context(repo=REPO, out_dir=tmp_path, work=tmp_path, dry_run=True)
    sleeper = ("import subprocess, sys, time\n"
               "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
               f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
               "time.sleep(120)\n")

    def slow(ctx, clock, result):
        call(ctx, clock, [sys.executable, "-c", sleeper])

    def broken(ctx, clock, result):
        raise RuntimeError("boom")

    def quick(ctx, clock, result):
        done = call(ctx, clock, [sys.executable, "-c", "print('next stage ran')"])
        result.note = done.stdout.strip()

    t0 = time.monotonic()
    results = run_stages(ctx, [("slow", 3.0, slow), ("broken", 5.0, broken), ("quick", 30.0, quick)])
    assert time.monotonic() - t0 < 30
    assert [(r.name, r.status) for r in results] == [("slow", "timeout"), ("broken", "failed"), ("quick", "ok")]
    assert 3.0 <= results[0].wall_s < 15 and "cut at its budget of 3 s" in results[0].note
    assert "RuntimeError: boom" in results[1].note
    assert results[2].note == "next stage ran"
    grandchild = int(pid_file.read_text())
    time.sleep(0.5)
    try:
        state = Path(f"/proc/{grandchild}/status").read_text()
        assert "State:\tZ" in state, "the stage's grandchild outlived the stage"
    except FileNotFoundError:
        pass  # gone: killed with the stage's process group


def test_a_cut_bench_still_writes_the_report(tmp_path):
    out = tmp_path / "out"
    done = _script(out, "--dry-run", "--stages", "bench", "--budget", "bench=2", timeout=60)
    assert done.returncode == 1
    doc = json.loads((out / "gpucheck.json").read_text())
    stages = {s["name"]: s for s in doc["stages"]}
    assert stages["bench"]["status"] == "timeout" and stages["report"]["status"] == "ok"
    assert doc["bench"]["status"]["kron_linear"]["status"] == "timeout"
    assert "| bench | timeout |" in (out / "report.md").read_text()


def test_bad_arguments_name_the_argument(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="out_dir"):
        gpucheck.run_check(a_file, dry_run=True)
    with pytest.raises(TypeError, match="out_dir"):
        gpucheck.run_check(3, dry_run=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stages: unknown stage 'gpu'"):
        gpucheck.run_check(tmp_path / "o", stages=["gpu"])
    with pytest.raises(ValueError, match="budgets: unknown stage 'bench2'"):
        gpucheck.run_check(tmp_path / "o", budgets={"bench2": 3})
    with pytest.raises(ValueError, match="budgets: seconds for 'bench' must be positive"):
        gpucheck.run_check(tmp_path / "o", budgets={"bench": 0})
    with pytest.raises(TypeError, match="budgets: seconds for 'bench' must be a number"):
        gpucheck.run_check(tmp_path / "o", budgets={"bench": "3"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="bench_families"):
        gpucheck.run_check(tmp_path / "o", bench_families="rsvd")  # type: ignore[arg-type]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing ran


def test_cli_rejects_bad_budget_and_stage(tmp_path, capsys):
    from svdkernels.__main__ import main

    for argv, needle in ((["--budget", "bench"], "expected STAGE=SECONDS"),
                         (["--budget", "bench=soon"], "seconds must be a number"),
                         (["--stages", "nope"], "stages: unknown stage 'nope'")):
        with pytest.raises(SystemExit) as e:
            main(["gpucheck", "--out", str(tmp_path / "o"), "--dry-run", *argv])
        assert e.value.code == 2
        assert needle in capsys.readouterr().err
    usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_parse_pytest_lines_plain_and_xdist():
    text = (
        "tests/ops/test_rsvd.py::test_a[x-1] PASSED                 [  1%]\n"
        "tests/triton/test_rsvd_kernels.py::test_b FAILED             [  2%]\n"
        "[gw3] [ 50%] PASSED tests/triton/test_kron_linear_kernels.py::test_c[bf16] \n"
        "[gw1] [ 60%] SKIPPED tests/ops/test_lowrank_quant.py::test_d \n"
        "tests/ops/test_rsvd.py::test_a[x-1] ERROR\n"  # teardown error after the pass
    )
    outcomes = gpucheck.parse_pytest_lines(text)
    assert outcomes == {
        "tests/ops/test_rsvd.py::test_a[x-1]": "error",
        "tests/triton/test_rsvd_kernels.py::test_b": "failed",
        "tests/triton/test_kron_linear_kernels.py::test_c[bf16]": "passed",
        "tests/ops/test_lowrank_quant.py::test_d": "skipped",
    }
    fams = gpucheck.per_family(outcomes)
    assert fams["rsvd"]["error"] == 1 and fams["rsvd"]["failed"] == 1 and fams["kron_linear"]["passed"] == 1
    assert gpucheck.family_of("tests/triton/test_lowrank_attention_kernels.py::t") == "lowrank_attention"


def test_parse_junit(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.ops.test_rsvd" name="test_ok" time="0.1"/>'
        '<testcase classname="tests.triton.test_rsvd_kernels" name="test_bad[bf16]" time="0.1">'
        '<failure message="AssertionError: 3 != 4">trace</failure></testcase>'
        '<testcase classname="tests.ops.test_kron_linear" name="test_skip"><skipped message="no"/></testcase>'
        '<testcase classname="tests.ops.test_kron_linear" name="test_xf">'
        '<skipped type="pytest.xfail" message="x"/></testcase>'
        "</testsuite></testsuites>"
    )
    outcomes, failures = gpucheck.parse_junit(xml)
    assert outcomes == {
        "tests/ops/test_rsvd.py::test_ok": "passed",
        "tests/triton/test_rsvd_kernels.py::test_bad[bf16]": "failed",
        "tests/ops/test_kron_linear.py::test_skip": "skipped",
        "tests/ops/test_kron_linear.py::test_xf": "xfailed",
    }
    assert failures == [{"test": "tests/triton/test_rsvd_kernels.py::test_bad[bf16]",
                         "message": "AssertionError: 3 != 4"}]


def test_roofline_fraction_and_markdown_of_a_failed_run():
    bench = {"families": {"rsvd": [
        {"workload": "w", "method": "ours", "kind": "ours", "time_ms": 2.0, "errors": {"err": 1.0}},
        {"workload": "w", "method": "roofline (hw limit)", "kind": "roofline", "time_ms": 0.5,
         "extra": {"measured_over_limit": 4.0, "bound": "memory"}},
    ]}}
    roof = gpucheck.roofline_fractions(bench)
    assert roof == [{"family": "rsvd", "workload": "w", "method": "roofline (hw limit)", "limit_ms": 0.5,
                     "measured_ms": 2.0, "fraction": 0.25, "bound": "memory"}]
    doc = {
        "ok": False, "dry_run": False, "wall_s": 300.0, "started": "t",
        "environment": {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "sm_count": 132},
        "stages": [{"name": "kernel_tests", "status": "timeout", "wall_s": 180.0, "budget_s": 180.0,
                    "note": "cut | at its budget"}],
        "kernel_tests": {"complete": False, "families": {"rsvd": {"passed": 3, "failed": 1, "error": 0,
                                                                  "skipped": 0, "xfailed": 0, "xpassed": 0}},
                         "failures": [{"test": "t::x", "message": "boom"}]},
        "bench": {"status": {"rsvd": {"status": "ok", "wall_s": 9.0}}, "rows": bench["families"], "roofline": roof},
        "files": ["gpucheck.json", "report.md"],
    }
    md = gpucheck.render_markdown(doc)
    assert "**FAIL**" in md and "NVIDIA H100 80GB HBM3, sm 9.0, 132 SMs" in md
    assert "| kernel_tests | timeout | 180.0 | 180 | cut \\| at its budget |" in md
    assert "Cut by the budget" in md and "| rsvd | FAIL | 3 | 1 | 0 | 0 |" in md and "- `t::x`: boom" in md
    assert "| rsvd | w | roofline (hw limit) | 2 | 0.5 | 0.25 | memory |" in md


def _fake_python(tmp_path: Path, body: str = "exit 0") -> tuple[str, Path]:
    """An executable standing in for the machine's python: it records its arguments and
    TRITON_INTERPRET, then runs ``body``."""
    log = tmp_path / "calls.txt"
    exe = tmp_path / "fake-python"
    exe.write_text(f'#!/bin/sh\necho "interpret=${{TRITON_INTERPRET:-unset}} $*" >> "{log}"\n{body}\n')
    exe.chmod(0o755)
    return str(exe), log


def test_gpu_mode_commands(tmp_path):
    # The commands the real GPU run would start, checked without a GPU: interpreter
    # off, every kernel test but the compile check, the bench on CUDA per family.
    python, log = _fake_python(tmp_path)
    ctx = Context(repo=REPO, out_dir=tmp_path, work=tmp_path, dry_run=False, python=python)
    ctx.data["environment"] = {"cuda_available": True}
    stages = [(name, 30.0, BODIES[name]) for name in ("build", "kernel_tests", "bench")]
    results = {r.name: r for r in run_stages(ctx, stages)}
    calls = log.read_text().splitlines()
    assert all(c.startswith("interpret=unset ") for c in calls), calls
    assert calls[0].endswith("setup.py -q build_ext --inplace") and results["build"].status == "ok"
    pytest_call = next(c for c in calls if " -m pytest " in c)
    assert " tests/triton tests/ops " in pytest_call and "--ignore=tests/triton/test_compile.py" in pytest_call
    assert " -k " not in pytest_call and "--junitxml=" in pytest_call
    bench_calls = [c for c in calls if " -m svdkernels bench " in c]
    assert [c.split("--only ")[1].split()[0] for c in bench_calls] == list(gpucheck.BENCH_FAMILIES)
    assert all("--quick --device cuda" in c and "--repeats" not in c for c in bench_calls)
    # The fake ran no test and wrote no bench.json: both stages say so.
    assert results["kernel_tests"].status == "failed" and results["kernel_tests"].note == "no test ran"
    assert results["bench"].status == "failed"


def test_a_cut_or_failed_build_is_optional(tmp_path):
    python, _ = _fake_python(tmp_path, "sleep 30")
    ctx = Context(repo=REPO, out_dir=tmp_path, work=tmp_path, dry_run=False, python=python)
    ctx.data["environment"] = {"cuda_available": True}
    [cut] = run_stages(ctx, [("build", 1.0, BODIES["build"])])
    assert cut.status == "skipped" and "cut at its budget of 1 s (optional)" in cut.note and cut.wall_s < 10
    python, _ = _fake_python(tmp_path, "exit 1")
    ctx.python = python
    [failed] = run_stages(ctx, [("build", 10.0, BODIES["build"])])
    assert failed.status == "skipped" and "not built" in failed.note


def test_several_bench_families_are_merged_into_one_plot(tmp_path):
    # Each family runs in its own child; the report redraws one bench.png from all rows.
    rows = [{"workload": "w", "method": m, "time_ms": t, "kind": k, "errors": {}, "note": "", "extra": {},
             "family": "", "vs_ours": None} for m, t, k in (("ours", 2.0, "ours"), ("peer", 3.0, "peer"))]
    merged = {"machine": {}, "peaks": {}, "families": {"rsvd": rows, "kron_linear": rows}}
    ctx = Context(repo=REPO, out_dir=tmp_path, work=tmp_path, dry_run=True)
    ctx.data["bench"] = {"status": {"rsvd": {"status": "ok", "wall_s": 1.0, "png": "a.png"},
                                    "kron_linear": {"status": "ok", "wall_s": 1.0, "png": "b.png"}},
                         "doc": merged}
    [report] = run_stages(ctx, [("report", 60.0, BODIES["report"])])
    assert report.status == "ok" and ctx.data["files"] == sorted(
        ["bench.json", "bench.png", "gpucheck.json", "gpucheck.log", "report.md"])
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "bench.json").read_text())["families"].keys() == {"rsvd", "kron_linear"}


def test_a_slow_bench_family_is_cut_at_its_share_and_the_next_runs(tmp_path):
    python, log = _fake_python(tmp_path, 'case "$*" in *"--only rsvd"*) sleep 30;; esac\nexit 0')
    ctx = Context(repo=REPO, out_dir=tmp_path, work=tmp_path, dry_run=False, python=python)
    ctx.data.update(environment={"cuda_available": True}, bench_families=["rsvd", "kron_linear"])
    [bench] = run_stages(ctx, [("bench", 4.0, BODIES["bench"])])
    status = ctx.data["bench"]["status"]
    assert status["rsvd"]["status"] == "timeout" and 1.5 < status["rsvd"]["wall_s"] < 4
    assert status["kron_linear"]["status"] == "failed"  # it ran (the stand-in writes no bench.json)
    assert "--only kron_linear" in log.read_text()
    assert bench.status == "timeout" and bench.note == ("cut at their share of the budget: rsvd; "
                                                        "failed: kron_linear")
