"""The harness's measurements as rows of one markdown table, and the line that names the machine."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
from typing import TYPE_CHECKING

import psutil

from bench.stats import mb, num, percentile

if TYPE_CHECKING:
    from collections.abc import Iterable


@dataclasses.dataclass
class Row:
    """One measurement: a mode at one N."""

    mode: str
    n: int
    done: int  # items that arrived (POSTs at the receiver; tasks that succeeded for the floor)
    wall_s: float | None  # a run's queued_at → end_date; the raw loop's own clock around its POSTs
    reference: str = ""
    reference_rate: float | None = None
    run_s: float | None = None  # a run's start_date → end_date (REST): without the scheduler starting it
    reference_run_rate: float | None = None  # the reference's rate by that interval (default: reference_rate)
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    peak_task_rss: int | None = None  # bytes
    peak_sum_rss: int | None = None  # bytes
    load: str = ""
    note: str = ""

    @property
    def rate(self) -> float | None:
        return self.done / self.wall_s if self.wall_s else None

    @property
    def ratio(self) -> float | None:
        return self.rate / self.reference_rate if self.rate and self.reference_rate else None

    @property
    def run_rate(self) -> float | None:
        return self.done / self.run_s if self.run_s else None

    @property
    def run_ratio(self) -> float | None:
        reference = self.reference_run_rate or self.reference_rate
        return self.run_rate / reference if self.run_rate and reference else None

    def against(self, reference: str, rate: float | None, run_rate: float | None = None) -> Row:
        """This row measured against a reference (its name, its rate and its rate by run start→end)."""
        self.reference, self.reference_rate, self.reference_run_rate = reference, rate, run_rate
        return self


def format_table(rows: Iterable[Row]) -> str:
    """A markdown table of the rows; — where a value does not apply."""
    lines = [
        "| mode | N | done | wall s | items/s | reference | ratio | run start→end s | items/s | ratio "
        "| commit→POST p50 ms | p95 ms | task RSS max MB | task RSS sum MB | load 1/5/15 | note |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row.mode} | {row.n} | {row.done} | {num(row.wall_s, '.1f')} | {num(row.rate, '.2f')} "
            f"| {row.reference or '—'} | {num(row.ratio, '.2f')} "
            f"| {num(row.run_s, '.1f')} | {num(row.run_rate, '.2f')} | {num(row.run_ratio, '.2f')} "
            f"| {num(percentile(row.latencies_ms, 50), '.0f')} "
            f"| {num(percentile(row.latencies_ms, 95), '.0f')} "
            f"| {mb(row.peak_task_rss)} | {mb(row.peak_sum_rss)} | {row.load} | {row.note} |"
        )
    return "\n".join(lines)


def concurrency_bound(in_flight: int, delay_ms: float) -> float | None:
    """Requests per second that ``in_flight`` POSTs at once can reach when each takes ``delay_ms``."""
    return in_flight * 1000 / delay_ms if delay_ms > 0 else None


def load_average() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


def machine() -> str:
    """When and where: the UTC minute, the host, its CPUs, memory and Python."""
    return (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}: {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"
    )
