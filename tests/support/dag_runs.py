"""Helpers for the tests that run the DAG: a window of recent CDRs, and the ledger as they read it."""

from __future__ import annotations

import datetime as dt
from typing import Any


def window(minutes: int = 30) -> dict[str, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return {"window_start": now - dt.timedelta(minutes=minutes), "window_end": now - dt.timedelta(seconds=1)}


def recent(seconds_ago: int) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds_ago)


def ledger(conn: Any) -> dict[str, dict[str, Any]]:
    rows = conn.execute(
        "SELECT cdr_id, status, attempts, http_status, error, run_id, map_index FROM cdr_webhook.delivery"
    ).fetchall()
    keys = ("status", "attempts", "http_status", "error", "run_id", "map_index")
    return {row[0]: dict(zip(keys, row[1:], strict=True)) for row in rows}
