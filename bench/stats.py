"""Statistics and number formatting shared by the benchmarks' tables."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` percentile (0–100) of ``values``, linear between the closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def num(value: float | None, fmt: str) -> str:
    """``value`` formatted, or — where there is none."""
    return "—" if value is None else format(value, fmt)


def mb(value: int | None) -> str:
    """Bytes as whole MiB, or — where there is none."""
    return "—" if value is None else f"{value / 2**20:.0f}"
