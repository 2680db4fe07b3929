"""Where a task try's time goes (its log lines and REST times) and where a run's wall time goes."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from bench.rest import ts
from bench.stats import num, percentile

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path


def try_phases(ti: dict[str, Any], lines: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Where one task try spent its time (ms), from its task instance (REST) and its log lines.

    ``queued→start``: the executor's pick-up and the fork (``start_date`` is set when the supervisor
    reports the child started); ``start→first log``: the task process starting up;
    ``DAG file parse``: the log's ``dag_file_parse_ms``; ``pre-execute rest``: the rest of the
    "Pre Execute" group; ``execute`` to the "Post Execute" group, split for ``post_cdr`` at its
    "Sending" line (claim, endpoint, body before; slot, POST, record after); ``post-execute``;
    ``last log→end``: reporting the state and exiting.
    """
    phases: dict[str, float] = {}
    events = [(line.get("event", ""), ts(line["timestamp"]), line) for line in lines if "timestamp" in line]
    if not events or not ti.get("start_date") or not ti.get("end_date"):
        return phases
    start, end = ts(ti["start_date"]), ts(ti["end_date"])
    if ti.get("queued_when"):
        phases["queued→start"] = (start - ts(ti["queued_when"])) * 1000
    phases["start→first log"] = (events[0][1] - start) * 1000
    groups = [at for event, at, _ in events if event.startswith("::")]
    parse = next((line for event, _, line in events if "dag_file_parse_ms" in line), None)
    if parse is not None:
        phases["DAG file parse"] = float(parse["dag_file_parse_ms"])
    post = next((at for event, at, _ in events if event == "::group::Post Execute"), None)
    if len(groups) >= 2 and post is not None:
        pre_end = groups[1]
        phases["pre-execute rest"] = (pre_end - events[0][1]) * 1000 - phases.get("DAG file parse", 0)
        sending = next((at for event, at, _ in events if event.startswith("Sending ")), None)
        if sending is not None:
            phases["execute: to 'Sending'"] = (sending - pre_end) * 1000
            phases["execute: 'Sending' on"] = (post - sending) * 1000
        phases["execute"] = (post - pre_end) * 1000
        phases["post-execute"] = (groups[-1] - post) * 1000
    phases["last log→end"] = (end - events[-1][1]) * 1000
    phases["start→end"] = (end - start) * 1000
    return phases


def logged_try_phases(home: Path, dag_id: str, tasks: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """:func:`try_phases` of each task try whose JSON log file is in the Airflow home ``home``."""
    found = []
    for ti in tasks:
        run = home / "logs" / f"dag_id={dag_id}" / f"run_id={ti['dag_run_id']}"
        path = (
            run
            / f"task_id={ti['task_id']}"
            / f"map_index={ti['map_index']}"
            / f"attempt={ti['try_number']}.log"
        )
        if path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
            found.append(try_phases(ti, lines))
    return found


def run_timeline(run: dict[str, Any], tis: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Where a run's wall time went (ms): before, in and after its select step, and its mapped tasks.

    ``run queued→run start``: the scheduler starting the run (its ``start_date``, where the REST
    API's run start→end begins); ``run queued→select start``: that and the select task's process;
    ``select start→end``: the select step's try; ``select end→first mapped start``: expanding the
    mapped task and starting the first; ``mapped: first start→last end``: the mapped tries, as many
    at once as allowed (and the spread of their starts); ``last mapped end→run end``: the scheduler
    closing the run.
    """
    select = next((ti for ti in tis if ti["map_index"] < 0 and ti.get("start_date")), None)
    mapped = [ti for ti in tis if ti["map_index"] >= 0 and ti.get("start_date") and ti.get("end_date")]
    timeline: dict[str, float] = {}
    if select is None or not mapped or not select.get("end_date"):
        return timeline
    first = min(ts(ti["start_date"]) for ti in mapped)
    last = max(ts(ti["end_date"]) for ti in mapped)
    if run.get("start_date"):  # the scheduler starting the run: outside the run's start→end interval
        timeline["run queued→run start"] = (ts(run["start_date"]) - ts(run["queued_at"])) * 1000
    timeline["run queued→select start"] = (ts(select["start_date"]) - ts(run["queued_at"])) * 1000
    timeline["select start→end"] = (ts(select["end_date"]) - ts(select["start_date"])) * 1000
    timeline["select end→first mapped start"] = (first - ts(select["end_date"])) * 1000
    timeline["mapped: first start→last end"] = (last - first) * 1000
    timeline["mapped: first start→last start"] = (max(ts(ti["start_date"]) for ti in mapped) - first) * 1000
    timeline["last mapped end→run end"] = (ts(run["end_date"]) - last) * 1000
    timeline["run (wall)"] = (ts(run["end_date"]) - ts(run["queued_at"])) * 1000
    return timeline


def format_phases(columns: dict[str, list[dict[str, float]]], per: str = "try") -> str:
    """A markdown table: one row per phase, the median (ms) of each column's tries (or runs)."""
    names: list[str] = []
    for tries in columns.values():
        for phases in tries:
            names += [name for name in phases if name not in names]
    plural = "tries" if per == "try" else f"{per}s"
    heads = " | ".join(f"{label} ({len(tries)} {plural})" for label, tries in columns.items())
    lines = [
        f"| phase (median ms per {per}) | {heads} |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for name in names:
        cells = []
        for tries in columns.values():
            values = [phases[name] for phases in tries if name in phases]
            cells.append(num(percentile(values, 50), ".0f"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
