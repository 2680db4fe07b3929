"""Helpers for the tests of the POST tasks: a stand-in for Airflow's task instance, ledger rows of
one endpoint, and that endpoint's connection."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from demo.connections import http_conn

API_KEY = "k3y-echoed-7d41c0ffee9b2e"
SECRET = "whsec_" + base64.b64encode(b"operator-test-signing-key-32byte").decode()
ENDPOINT = "cdr_webhook_client_7"


@dataclasses.dataclass
class FakeTaskInstance:
    """The attributes of Airflow's RuntimeTaskInstance that the operator reads."""

    run_id: str = "scheduled__1"
    map_index: int = 0
    try_number: int = 1
    max_tries: int = 2
    dag_id: str = "cdr_webhook"


def queue(conn, cdr_id: str, *, run_id: str | None = "scheduled__1", status: str = "queued", **extra) -> None:
    created = conn.execute(
        "SELECT created_at FROM cdr_webhook_source WHERE cdr_id::text = %s", (cdr_id,)
    ).fetchone()[0]
    conn.execute(
        "INSERT INTO cdr_webhook.delivery "
        "(cdr_id, endpoint, client_id, cdr_created_at, status, dag_id, run_id, claimed_at) "
        "VALUES (%s, %s, 7, %s, %s, 'cdr_webhook', %s, now())",
        (cdr_id, ENDPOINT, created, status, run_id),
    )
    if extra:
        for column, value in extra.items():
            conn.execute(
                f"UPDATE cdr_webhook.delivery SET {column} = %s WHERE cdr_id = %s",  # test-only column names
                (value, cdr_id),
            )


def row(conn, cdr_id: str) -> dict[str, Any]:
    cur = conn.execute(
        "SELECT status, attempts, http_status, error, response_excerpt, run_id FROM cdr_webhook.delivery "
        "WHERE cdr_id = %s",
        (cdr_id,),
    )
    return dict(zip([c.name for c in cur.description], cur.fetchone(), strict=True))


def endpoint_state(conn) -> dict[str, Any]:
    cur = conn.execute(
        "SELECT paused, reason, consecutive_failures, failed_attempts FROM cdr_webhook.endpoint_state "
        "WHERE endpoint = %s",
        (ENDPOINT,),
    )
    found = cur.fetchone()
    return dict(zip([c.name for c in cur.description], found, strict=True)) if found else {}


def connect_endpoint(monkeypatch, url: str, **extra: Any) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{ENDPOINT.upper()}", http_conn(url, api_key=API_KEY, **extra))
