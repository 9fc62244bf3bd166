"""The train_methods bench family's pieces: forgetting, the continual-learning driver on
synthetic tasks, and the hook that appends another module's rows."""
import sys
import types

import pytest

from svdkernels.bench import Row
from svdkernels.bench import train_methods as tm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_forgetting_is_mean_drop_of_earlier_tasks():
    acc = [[0.9], [0.8, 0.95], [0.7, 0.85, 0.99]]
    assert tm.forgetting(acc) == pytest.approx(((0.9 - 0.7) + (0.95 - 0.85)) / 2)


def test_run_continual_on_synthetic_tasks_every_method():
    tasks = tm.synthetic_tasks()
    wl = tm.CLWorkload(steps=3, batch=8, lr=3e-3, hidden=64)
    for method in ("full", "lora", "osf"):
        res = tm.run_continual(method, wl, tasks)
        assert [len(row) for row in res["acc"]] == [1, 2, 3]
        assert all(0.0 <= a <= 1.0 for row in res["acc"] for a in row)
        assert res["step_ms"] > 0


def test_extra_row_modules_are_appended(monkeypatch):
    mod = types.ModuleType("fake_train_rows")
    mod.rows = lambda quick: [Row("fed", f"quick={quick}", 1.0)]
    monkeypatch.setitem(sys.modules, "fake_train_rows", mod)
    monkeypatch.setattr(tm, "EXTRA_ROW_MODULES", ("fake_train_rows",))
    assert [r.method for r in tm.extra_rows(True)] == ["quick=True"]
