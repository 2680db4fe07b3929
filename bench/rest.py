"""A benchmark's runs through Airflow's REST API: trigger and wait, task instances, REST times."""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from demo.stack import AirflowStack

PAGE = 100


def ts(value: str) -> float:
    """A REST timestamp (ISO 8601, ``Z`` or an offset) as seconds since the epoch."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def ts_or_none(value: str | None) -> float | None:
    return ts(value) if value else None


def run_dag(stack: AirflowStack, dag_id: str, conf: dict[str, Any], timeout: float = 7200) -> dict[str, Any]:
    """Trigger a run and wait for it to end; return the run as the REST API shows it."""
    run_id = stack.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})[
        "dag_run_id"
    ]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = stack.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
        if run["state"] in ("success", "failed"):
            return run
        time.sleep(0.5)
    raise TimeoutError(f"{dag_id} run {run_id} not finished after {timeout:.0f} s")


def run_seconds(run: dict[str, Any], start: str = "queued_at") -> float | None:
    """A run's seconds from ``start`` (``queued_at``, or ``start_date``) to its ``end_date`` (REST)."""
    if not run.get(start) or not run.get("end_date"):
        return None
    return ts(run["end_date"]) - ts(run[start])


def task_instances(stack: AirflowStack, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """Every task instance of the run, page by page."""
    found: list[dict[str, Any]] = []
    while True:
        page = stack.api(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
            params={"limit": PAGE, "offset": len(found)},
        )["task_instances"]
        found += page
        if len(page) < PAGE:
            return found


def mapped_task_instances(stack: AirflowStack, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    return [ti for ti in task_instances(stack, dag_id, run_id) if ti["map_index"] >= 0]
