"""Fuzz: the C++ kernel (svdkernels._C), in a subprocess so that a crash fails this
test instead of killing the test run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fuzz_support import COUNTS, RESULTS

pytest.importorskip("svdkernels._C", reason="the C++ extension is not built")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpp_fuzz_worker.py")


def test_cpp_kernel_in_a_subprocess(tmp_path):
    out = tmp_path / "cpp_fuzz.json"
    proc = subprocess.run([sys.executable, WORKER, str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (f"the C++ fuzz worker died with exit status {proc.returncode} (a crash: "
                                  f"signal {-proc.returncode} if negative)\n{proc.stderr[-3000:]}")
    report = json.loads(out.read_text())
    COUNTS.update(report["counts"])
    RESULTS.update(report["results"])
    assert report["counts"], "the worker ran no case"
    assert not report["failures"], "\n\n".join(report["failures"])
