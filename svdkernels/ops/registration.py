"""Registering an op whose Triton launches torch.compile can trace, without importing
triton when svdkernels is imported.

``torch.library.triton_op`` scans the op's body for Triton kernels when it is
applied, and imports triton to do it. Importing svdkernels must not import triton:
a CPU install need not load it, and ``TRITON_INTERPRET=1`` must still be settable
afterwards. :func:`triton_op` applies torch's decorator with triton unimportable for
that moment when triton is not loaded yet: the scan then finds no kernel, and only
the AOTAutograd cache key loses the kernels' source (editing a kernel would not
invalidate a cached compiled graph; restart with a clean cache after such edits).
The decomposition that makes the launches visible does not depend on the scan.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


class _BlockTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name == "triton" or name.startswith("triton."):
            raise ImportError("svdkernels: triton is not imported while the ops are registered")
        return None


class _DropScanWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Triton not available" not in record.getMessage()


@contextlib.contextmanager
def _triton_unimportable() -> Iterator[None]:
    if "triton" in sys.modules:  # already loaded: let torch scan the kernels
        yield
        return
    finder, quiet = _BlockTriton(), _DropScanWarning()
    logger = logging.getLogger("torch._library.triton")
    sys.meta_path.insert(0, finder)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        logger.removeFilter(quiet)


def triton_op(name: str, *, mutates_args: Iterable[str] | str = ()) -> Callable[[Callable[..., Any]], Any]:
    """``torch.library.triton_op(name, mutates_args=...)`` applied without importing triton
    (module docstring). The body must be traceable: validation on shapes and dtypes,
    Triton launches through ``torch.library.wrap_triton``, other backends behind an
    opaque ``custom_op``."""

    def deco(fn: Callable[..., Any]) -> Any:
        with _triton_unimportable():
            return torch.library.triton_op(name, mutates_args=mutates_args)(fn)

    return deco
