"""An endpoint's events beyond pause and resume: the test CDRs sent by hand, and the last events shown.

A test CDR is recorded here only, never in ``cdr_webhook.delivery``: it counts in no backlog, no
failure streak and no health chart (schema step 11 adds its columns to ``cdr_webhook.endpoint_event``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from psycopg.rows import class_row

from cdr_webhook.ledger.endpoints import MAX_ACTOR_CHARS, MAX_REASON_CHARS, check_name, clean_text

if TYPE_CHECKING:
    import datetime as dt

    import psycopg

#: The most of a receiver's reply a test event keeps, on one line (the page and the CLI show it whole).
MAX_EXCERPT_CHARS = 300


@dataclasses.dataclass(frozen=True)
class Event:
    """One event of an endpoint: a pause, a resume or a test CDR (with what the receiver answered)."""

    endpoint: str
    action: str
    reason: str | None
    actor: str
    at: dt.datetime
    cdr_id: str | None = None
    http_status: int | None = None
    latency_ms: int | None = None
    response_excerpt: str | None = None


_COLUMNS = "endpoint, action, reason, actor, at, cdr_id, http_status, latency_ms, response_excerpt"


def record_test(
    conn: psycopg.Connection[Any],
    endpoint: str,
    *,
    actor: str,
    verdict: str,
    cdr_id: str,
    http_status: int | None,
    latency_ms: int | None,
    excerpt: str | None,
) -> Event:
    """Record a test CDR sent to ``endpoint``: who, its verdict, the status, time taken and the excerpt."""
    check_name(endpoint)
    with conn.cursor(row_factory=class_row(Event)) as cur:
        event = cur.execute(
            "INSERT INTO cdr_webhook.endpoint_event (endpoint, action, reason, actor, cdr_id, http_status, "
            "latency_ms, response_excerpt) VALUES (%s, 'tested', %s, %s, %s, %s, %s, %s) "
            f"RETURNING {_COLUMNS}",
            (
                endpoint,
                clean_text(verdict, limit=MAX_REASON_CHARS),
                clean_text(actor, limit=MAX_ACTOR_CHARS),
                cdr_id,
                http_status,
                latency_ms,
                clean_text(excerpt, limit=MAX_EXCERPT_CHARS) if excerpt else None,
            ),
        ).fetchone()
    assert event is not None
    return event


def recent_events(conn: psycopg.Connection[Any], endpoint: str, *, limit: int = 20) -> list[Event]:
    """The endpoint's last ``limit`` events, newest first (pauses, resumes, tests)."""
    with conn.cursor(row_factory=class_row(Event)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM cdr_webhook.endpoint_event WHERE endpoint = %s "
            "ORDER BY at DESC, id DESC LIMIT %s",
            (endpoint, limit),
        ).fetchall()


def latest_client(conn: psycopg.Connection[Any], endpoint: str) -> int | None:
    """The client of the endpoint's newest ledger row (a test CDR names it), or None."""
    row = conn.execute(
        "SELECT client_id FROM cdr_webhook.delivery WHERE endpoint = %s AND client_id IS NOT NULL "
        "ORDER BY cdr_created_at DESC LIMIT 1",
        (endpoint,),
    ).fetchone()
    return None if row is None else int(row[0])
