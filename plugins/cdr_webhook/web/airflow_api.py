"""The page's actions on Airflow, through its REST API (``/api/v2``) with the caller's own token.

The page never writes Airflow's tables: a redelivery clears mapped ``post_cdr`` task instances, and a
completeness fix triggers a run with Params, both as the signed-in user, so Airflow applies its own
permissions, audit log and state machine.
"""

from __future__ import annotations

import dataclasses
import json
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


#: Airflow's own error texts are short; a longer ``detail`` is cut to this many characters.
_DETAIL_CHARS = 300


class AirflowApi:
    """Calls to one api-server as one user.

    The address is configured (:func:`cdr_webhook.web.deps.api_base_url`), never taken from the request:
    a ``Host`` header is the client's to choose. The session takes no proxy from the environment and
    follows no redirect, so a call goes to that address and nowhere else; an error shows Airflow's own
    ``detail`` (or only the status), never the body of whatever else answered.
    """

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._session = requests.Session()
        self._session.trust_env = False  # no HTTP(S)_PROXY, no .netrc credentials

    def _call(self, method: str, path: str, body: Mapping[str, Any]) -> Any:
        try:
            response = self._session.request(
                method,
                f"{self.base_url}/api/v2{path}",
                json=body,
                headers={"authorization": f"Bearer {self._token}"},
                timeout=_TIMEOUT_SECONDS,
                allow_redirects=False,
            )
        except requests.RequestException as err:
            raise AirflowApiError(
                0, f"Airflow's API at {self.base_url} did not answer ({type(err).__name__})"
            ) from None
        if not 200 <= response.status_code < 300:
            raise AirflowApiError(
                response.status_code, f"Airflow answered HTTP {response.status_code}{_detail(response)}"
            )
        try:
            return response.json() if response.content else None
        except ValueError:
            raise AirflowApiError(response.status_code, "Airflow's answer was not JSON") from None

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


def _detail(response: requests.Response) -> str:
    """``: <detail>`` of Airflow's JSON error, else nothing: another server's body is never shown."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return ""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return ""
    if detail is None:
        return ""
    text = detail if isinstance(detail, str) else json.dumps(detail)
    return ": " + (text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "…")
