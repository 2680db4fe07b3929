"""The page's actions on Airflow, through its REST API (``/api/v2``) with the caller's own token.

The page never writes Airflow's tables: a redelivery clears mapped ``post_cdr`` task instances, and a
completeness fix triggers a run with Params, both as the signed-in user, so Airflow applies its own
permissions, audit log and state machine.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import requests

from cdr_webhook.settings import DAG_ID, POST_TASK_ID

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

_TIMEOUT_SECONDS = 30


class AirflowApiError(RuntimeError):
    """Airflow refused or failed a call; the message carries its status and detail."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Cleared:
    """The task instances one clear call reset in one run."""

    run_id: str
    map_indexes: list[int]


def ui_run_path(run_id: str) -> str:
    return f"/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"


def ui_task_path(run_id: str, map_index: int | None, task_id: str = POST_TASK_ID) -> str:
    """The task instance's page in Airflow's UI; its first tab is the log."""
    path = f"{ui_run_path(run_id)}/tasks/{quote(task_id, safe='')}"
    return f"{path}/mapped/{map_index}" if map_index is not None and map_index >= 0 else path


class AirflowApi:
    """Calls to one api-server as one user."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token

    def _call(self, method: str, path: str, body: Mapping[str, Any]) -> Any:
        response = requests.request(
            method,
            f"{self.base_url}/api/v2{path}",
            json=body,
            headers={"authorization": f"Bearer {self._token}"},
            timeout=_TIMEOUT_SECONDS,
        )
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise AirflowApiError(
                response.status_code, f"Airflow answered HTTP {response.status_code}: {detail}"
            )
        return response.json() if response.content else None

    def clear_tasks(self, run_id: str, map_indexes: Iterable[int]) -> Cleared:
        """Clear these mapped ``post_cdr`` task instances of one run (their run goes back to running)."""
        indexes = sorted(set(map_indexes))
        self._call(
            "POST",
            f"/dags/{DAG_ID}/clearTaskInstances",
            {
                "dry_run": False,
                "dag_run_id": run_id,
                "task_ids": [[POST_TASK_ID, index] for index in indexes],
                "only_failed": False,
                "reset_dag_runs": True,
            },
        )
        return Cleared(run_id=run_id, map_indexes=indexes)

    def trigger(self, conf: Mapping[str, Any]) -> str:
        """Trigger a run of the DAG with these Params; return its run id."""
        run = self._call("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": dict(conf)})
        return run["dag_run_id"]
