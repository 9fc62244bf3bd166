"""What every C++ kernel test module shares: the extension gate and the
instruction-set paths this CPU runs (``tests/cpp`` is on ``sys.path`` under pytest's
rootdir-relative imports, as ``tests/fuzz/fuzz_support.py`` is)."""
from __future__ import annotations

import os

import pytest
import torch

from svdkernels.backends import cpp_available

ISA_NAMES = {0: "generic", 1: "avx2", 2: "avx512", 3: "avx512bf16"}
"""Test ids of the ``isa=`` values of the C++ ops."""


def require_extension() -> None:
    """Skip the calling test module when ``svdkernels._C`` is not built (a compiler or
    torch's headers were missing at install time), or fail it where
    ``SVDKERNELS_REQUIRE_EXTENSION`` is set (CI: a broken build must not pass as
    skipped); else load the extension, which registers ``torch.ops.svdkernels._cpp_*``."""
    if not cpp_available():
        if os.environ.get("SVDKERNELS_REQUIRE_EXTENSION", "").strip() not in ("", "0"):
            raise RuntimeError("svdkernels._C is not built but SVDKERNELS_REQUIRE_EXTENSION is set")
        pytest.skip("svdkernels._C is not built", allow_module_level=True)
    import svdkernels._C  # noqa: F401


def isas() -> list[int]:
    """Every ``isa=`` path this CPU runs (0 portable up to the best one)."""
    return list(range(torch.ops.svdkernels._cpp_best_isa() + 1))
