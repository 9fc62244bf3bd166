"""The family registry: each ``svdkernels/bench/<family>.py`` registers a generator of
rows with :func:`register`; :func:`load_families` discovers them."""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from svdkernels.bench.rows import Row

T = TypeVar("T")

MACHINERY = frozenset({"peaks", "registry", "report", "rows", "runner", "timing"})
"""Modules of svdkernels.bench that hold the machinery, not a family."""


@dataclass(frozen=True)
class Family:
    """A registered benchmark family (see :func:`register`)."""

    name: str
    fn: Callable[[bool, int], Iterable[Row | str]]
    count: Callable[[bool], int] | None = None
    legend: str = ""
    plot: Callable[[Sequence[Row], Path], bool] | None = None


FAMILIES: dict[str, Family] = {}


def register(
    name: str,
    *,
    count: Callable[[bool], int] | None = None,
    legend: str = "",
    plot: Callable[[Sequence[Row], Path], bool] | None = None,
) -> Callable[[T], T]:
    """Register ``fn(quick, repeats)`` as benchmark family ``name``.

    ``fn`` yields :class:`Row` objects, and may yield a workload's name (a ``str``)
    right before measuring it. ``count(quick)`` is the number of workloads, for
    the progress bar's total; ``legend`` is printed under the family's table to
    explain its error columns; ``plot(rows, path)``, if given, draws the family's
    own picture (``OUT/<name>.png``, beside the shared ``bench.png``) and returns
    whether it wrote one.
    """

    def deco(fn: T) -> T:
        if name in FAMILIES:
            raise ValueError(f"register(name): family {name!r} is already registered")
        FAMILIES[name] = Family(name, fn, count, legend, plot)  # type: ignore[arg-type]
        return fn

    return deco


def load_families() -> dict[str, Family]:
    """Import every module of ``svdkernels.bench``, each of which registers its family.

    Discovery (rather than a fixed list) lets a new family be one new file.
    """
    import svdkernels.bench as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name not in MACHINERY:
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    return FAMILIES
