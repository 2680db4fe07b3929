"""Pause and resume of webhook endpoints: their state, the automatic pause rules and the audit trail.

An endpoint is an HTTP connection id; its row in ``cdr_webhook.endpoint_state`` may be paused by hand or
by :func:`record_outcomes`, and every pause and resume is written to ``cdr_webhook.endpoint_event``.
"""

from __future__ import annotations

import dataclasses
import logging
import unicodedata
from typing import TYPE_CHECKING, Any

from psycopg.rows import class_row

from cdr_webhook.db import without_jit
from cdr_webhook.ledger import watch_requests
from cdr_webhook.ledger.claims import release_many
from cdr_webhook.routing import is_route_name

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Sequence

    import psycopg

    from cdr_webhook.endpoint_config import EndpointConfigError
    from cdr_webhook.ledger.claims import Claim

log = logging.getLogger(__name__)

GONE_REASON = "HTTP 410 Gone: the receiver says this endpoint is gone"
#: The actor of the pauses the delivery makes itself (a held connection, the pause rules).
AUTOMATIC_ACTOR = "cdr_webhook"

#: An endpoint is an Airflow connection id: at most 250 characters, Airflow's own column length.
MAX_ENDPOINT_CHARS = 250
#: A pause's reason and its actor as stored and shown (the Endpoints page, the CLI's table, the log).
MAX_REASON_CHARS = 500
MAX_ACTOR_CHARS = 200
#: The connection ids the routing sends to (routing.py): an endpoint may be paused before
#: it has ledger rows only when its name has one of these shapes.


class EndpointNameError(ValueError):
    """A name that is not an endpoint one may pause (the message says what is accepted)."""


def clean_text(text: str, *, limit: int) -> str:
    """
    ``text`` on one line: control characters (a newline forges a log line, an escape sequence
    repaints a terminal) and line separators become spaces; cut at ``limit`` characters.
    """
    cleaned = "".join(
        " " if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") else char for char in text
    ).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def check_name(endpoint: str) -> str:
    """The endpoint's name if it could be a connection id: not empty, no control character, bounded."""
    if (
        not endpoint
        or len(endpoint) > MAX_ENDPOINT_CHARS
        or clean_text(endpoint, limit=MAX_ENDPOINT_CHARS) != endpoint
    ):
        raise EndpointNameError(
            f"not an endpoint name: {endpoint[:60]!r} (a connection id: 1 to {MAX_ENDPOINT_CHARS} "
            "characters, no control characters or surrounding spaces)"
        )
    return endpoint


def check_pausable(conn: psycopg.Connection[Any], endpoint: str) -> str:
    """
    ``endpoint`` if a person may pause it: it has ledger rows or a state row, or it is named as the
    routing names endpoints (``cdr_webhook``, ``cdr_webhook_client_<id>``). Any other name (the CDR
    database's ``cdr_db``, a typo) would add a row the Endpoints page then shows to every viewer.
    """
    check_name(endpoint)
    if is_route_name(endpoint):
        return endpoint
    known = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM cdr_webhook.endpoint_state WHERE endpoint = %(e)s) "
        "OR EXISTS (SELECT 1 FROM cdr_webhook.delivery WHERE endpoint = %(e)s)",
        {"e": endpoint},
    ).fetchone()
    if not (known and known[0]):
        raise EndpointNameError(
            f"no endpoint {endpoint!r}: pause an endpoint with deliveries in the ledger, or one named "
            "cdr_webhook or cdr_webhook_client_<client id>"
        )
    return endpoint


@dataclasses.dataclass(frozen=True)
class EndpointEvent:
    """One pause or resume of an endpoint: who did it, when and why."""

    endpoint: str
    action: str
    reason: str | None
    actor: str
    at: dt.datetime


@dataclasses.dataclass(frozen=True)
class EndpointStatus:
    """An endpoint's state and its ledger backlog, as ``endpoints list`` shows it."""

    endpoint: str
    paused: bool
    reason: str | None
    changed_by: str | None
    changed_at: dt.datetime | None
    consecutive_failures: int
    last_success_at: dt.datetime | None
    queued: int
    failed: int


def _record_event(
    conn: psycopg.Connection[Any], endpoint: str, action: str, reason: str | None, actor: str
) -> EndpointEvent:
    with conn.cursor(row_factory=class_row(EndpointEvent)) as cur:
        event = cur.execute(
            "INSERT INTO cdr_webhook.endpoint_event (endpoint, action, reason, actor) "
            "VALUES (%s, %s, %s, %s) RETURNING endpoint, action, reason, actor, at",
            (endpoint, action, reason, actor),
        ).fetchone()
    assert event is not None
    return event


def set_paused(conn: psycopg.Connection[Any], endpoint: str, reason: str, actor: str) -> EndpointEvent | None:
    # The WHERE on the conflict branch makes "already paused" a no-op that returns no row, and the
    # row lock it takes makes two concurrent pauses record one event, not two.
    row = conn.execute(
        "INSERT INTO cdr_webhook.endpoint_state AS s (endpoint, paused, reason, changed_by, changed_at) "
        "VALUES (%(endpoint)s, true, %(reason)s, %(actor)s, now()) "
        "ON CONFLICT (endpoint) DO UPDATE SET paused = true, reason = EXCLUDED.reason, "
        "changed_by = EXCLUDED.changed_by, changed_at = now(), updated_at = now() WHERE NOT s.paused "
        "RETURNING 1",
        {"endpoint": endpoint, "reason": reason, "actor": actor},
    ).fetchone()
    if row is None:
        return None
    return _record_event(conn, endpoint, "paused", reason, actor)


def pause(conn: psycopg.Connection[Any], endpoint: str, *, reason: str, actor: str) -> EndpointEvent | None:
    """
    Pause an endpoint; return the event, or None when it was paused already (nothing changes).

    The reason and actor are stored on one line and bounded (:func:`clean_text`); a name that could
    not be a connection id is refused (:func:`check_name`). A person's pause checks the name
    against the ledger first (:func:`check_pausable`).
    """
    check_name(endpoint)
    with conn.transaction():
        return set_paused(
            conn,
            endpoint,
            clean_text(reason, limit=MAX_REASON_CHARS),
            clean_text(actor, limit=MAX_ACTOR_CHARS),
        )


def resume(
    conn: psycopg.Connection[Any], endpoint: str, *, actor: str, reason: str | None = None
) -> EndpointEvent | None:
    """Resume a paused endpoint with a clean failure count; return the event, or None if it was not paused."""
    actor = clean_text(actor, limit=MAX_ACTOR_CHARS)
    reason = clean_text(reason, limit=MAX_REASON_CHARS) or None if reason is not None else None
    with conn.transaction():
        # The count starts again: the old failures must not pause the endpoint on its next one.
        row = conn.execute(
            "UPDATE cdr_webhook.endpoint_state SET paused = false, reason = %(reason)s, "
            "changed_by = %(actor)s, changed_at = now(), consecutive_failures = 0, failing_since = NULL, "
            "updated_at = now() WHERE endpoint = %(endpoint)s AND paused RETURNING 1",
            {"endpoint": endpoint, "reason": reason, "actor": actor},
        ).fetchone()
        if row is None:
            return None
        # Its CDRs waited queued: the commit watcher (if one runs) starts a run for them now, rather
        # than leaving them to the next scheduled run.
        watch_requests.request_run(conn)
        return _record_event(conn, endpoint, "resumed", reason, actor)


def hold(
    conn: psycopg.Connection[Any], endpoint: str, claims: Sequence[Claim], err: EndpointConfigError
) -> EndpointEvent | None:
    """
    Hold an endpoint whose connection cannot be used: pause it with the reason and give its claims
    back to the queue, the reason on their rows. Returns the pause event (None if it was paused).

    No retry can mend a connection: its CDRs go out, in order, once it is fixed and resumed.
    """
    reason = f"configuration: {err}"
    release_many(conn, claims, reason=reason)
    return pause(conn, endpoint, reason=reason, actor=AUTOMATIC_ACTOR)


def failing_endpoints(conn: psycopg.Connection[Any]) -> set[str]:
    """Return the endpoints whose latest attempt failed (the select step throttles them)."""
    rows = conn.execute(
        "SELECT endpoint FROM cdr_webhook.endpoint_state WHERE failed_attempts > 0"
    ).fetchall()
    return {row[0] for row in rows}


def prune_events(conn: psycopg.Connection[Any], *, before: dt.datetime) -> int:
    """Delete the pause and resume events recorded before ``before``; return how many."""
    return conn.execute("DELETE FROM cdr_webhook.endpoint_event WHERE at < %s", (before,)).rowcount


def paused_endpoints(conn: psycopg.Connection[Any]) -> set[str]:
    """Return the connection ids of every paused endpoint."""
    rows = conn.execute("SELECT endpoint FROM cdr_webhook.endpoint_state WHERE paused").fetchall()
    return {row[0] for row in rows}


def is_paused(conn: psycopg.Connection[Any], endpoint: str) -> bool:
    """Return whether the endpoint is paused (an endpoint never seen is not)."""
    row = conn.execute(
        "SELECT paused FROM cdr_webhook.endpoint_state WHERE endpoint = %s", (endpoint,)
    ).fetchone()
    return bool(row and row[0])


def list_endpoints(conn: psycopg.Connection[Any], *, endpoint: str | None = None) -> list[EndpointStatus]:
    """
    Return every endpoint with a state row or ledger rows (or just ``endpoint``), ordered by name.

    Needs the ledger table too (:func:`cdr_webhook.ledger.schema.migrate` makes both). An endpoint with only
    delivered CDRs is listed as well: the ledger's endpoints are found one index probe each (a loose
    index scan), and only their queued and failed rows are counted.
    """
    query = """
        WITH RECURSIVE ledger_endpoints AS (
            (SELECT endpoint FROM cdr_webhook.delivery
             WHERE %(endpoint)s::text IS NULL OR endpoint = %(endpoint)s ORDER BY endpoint LIMIT 1)
            UNION ALL
            SELECT (SELECT n.endpoint FROM cdr_webhook.delivery AS n
                    WHERE n.endpoint > e.endpoint
                      AND (%(endpoint)s::text IS NULL OR n.endpoint = %(endpoint)s)
                    ORDER BY n.endpoint LIMIT 1)
            FROM ledger_endpoints AS e WHERE e.endpoint IS NOT NULL
        ),
        backlog AS (
            SELECT e.endpoint,
                   (SELECT count(*) FROM cdr_webhook.delivery AS d
                    WHERE d.endpoint = e.endpoint AND d.status = 'queued') AS queued,
                   (SELECT count(*) FROM cdr_webhook.delivery AS d
                    WHERE d.endpoint = e.endpoint AND d.status = 'failed') AS failed
            FROM ledger_endpoints AS e WHERE e.endpoint IS NOT NULL
        )
        SELECT COALESCE(s.endpoint, b.endpoint) AS endpoint, COALESCE(s.paused, false) AS paused,
               s.reason, s.changed_by, s.changed_at,
               COALESCE(s.consecutive_failures, 0) AS consecutive_failures, s.last_success_at,
               COALESCE(b.queued, 0)::int AS queued, COALESCE(b.failed, 0)::int AS failed
        FROM cdr_webhook.endpoint_state AS s FULL JOIN backlog AS b ON b.endpoint = s.endpoint
        WHERE %(endpoint)s::text IS NULL OR COALESCE(s.endpoint, b.endpoint) = %(endpoint)s
        ORDER BY 1
    """
    with without_jit(conn), conn.cursor(row_factory=class_row(EndpointStatus)) as cur:
        return cur.execute(query, {"endpoint": endpoint}).fetchall()
