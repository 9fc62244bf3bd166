"""A benchmark result row (:class:`Row`) and how rows of a workload are compared with ours."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    """One line of a family's table (and one entry of its JSON list).

    ``kind`` is ``"ours"`` (the row every other row of the workload is compared
    with), ``"peer"``, ``"bare"`` (a lower bound built from the same products) or
    ``"roofline"`` (``time_ms`` is then the time at the hardware limit).
    ``errors`` maps column headers to accuracy metrics; ``vs_ours`` is filled in
    by the runner: ``time_ms / ours.time_ms`` (> 1 means ours is faster).
    """

    workload: str
    method: str
    time_ms: float | None
    kind: str = "peer"
    errors: dict[str, float] = field(default_factory=dict)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    family: str = ""
    vs_ours: float | None = None


def fill_vs_ours(rows: Sequence[Row]) -> None:
    """Set ``vs_ours`` on every timed row of a workload that has an ``ours`` row."""
    ours = {}
    for row in rows:
        if row.kind == "ours" and row.time_ms:
            ours.setdefault(row.workload, row.time_ms)
    for row in rows:
        base = ours.get(row.workload)
        if base and row.time_ms is not None:
            row.vs_ours = row.time_ms / base
