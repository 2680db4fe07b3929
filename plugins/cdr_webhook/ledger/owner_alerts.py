"""The owner-alert outbox: the alerts owed to an endpoint's owner, stored and read; never sent from here.

Every pause and resume (by a 410, by the pause rules, by hand on the page or the CLI, in any process)
inserts its ``cdr_webhook.endpoint_event`` row; a trigger (schema step 15) adds the owner's alert in that
same statement, so no path can pause an endpoint without its alert being owed, and a rolled-back pause
owes none. The failure-rate alert is added by :func:`add_failure_rate_alerts` from the health rollup.
One sender (:mod:`cdr_webhook.deliver.owner`, the ``cdr_webhook_owner_alerts`` DAG) drains the outbox:
an alert stays ``pending`` with its error until every channel of its owner took it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from cdr_webhook.db import without_jit

if TYPE_CHECKING:
    import datetime as dt

    import psycopg

KINDS = ("paused", "resumed", "failure_rate")
#: An alert's life: owed (``pending``), taken by every channel (``sent``), the same kind sent to the
#: same endpoint within ``owner_alert_interval_minutes`` (``suppressed``), or no owner to tell.
STATUSES = ("pending", "sent", "suppressed", "no_contact")
MAX_ERROR_CHARS = 500

# Step 15 (the outbox). The trigger copies each pause and resume; the test CDRs' events ('tested')
# owe no alert. The pending index is what the sender reads each minute; the endpoint one its dedupe
# (the last alert of a kind) and the Endpoints page (the last alert of each endpoint).
DDL_V15 = """
CREATE TABLE IF NOT EXISTS cdr_webhook.owner_alert (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint        text        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('paused', 'resumed', 'failure_rate')),
    reason          text,
    actor           text,
    at              timestamptz NOT NULL DEFAULT now(),
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sent', 'suppressed', 'no_contact')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    last_error      text,
    email_sent_at   timestamptz,
    webhook_sent_at timestamptz,
    finished_at     timestamptz,
    message         jsonb
);
CREATE INDEX IF NOT EXISTS owner_alert_pending_idx
    ON cdr_webhook.owner_alert (next_attempt_at, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS owner_alert_endpoint_idx ON cdr_webhook.owner_alert (endpoint, kind, at);

CREATE OR REPLACE FUNCTION cdr_webhook.owe_owner_alert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cdr_webhook.owner_alert (endpoint, kind, reason, actor, at)
    VALUES (NEW.endpoint, NEW.action, NEW.reason, NEW.actor, NEW.at);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS endpoint_event_owes_owner_alert ON cdr_webhook.endpoint_event;
CREATE TRIGGER endpoint_event_owes_owner_alert AFTER INSERT ON cdr_webhook.endpoint_event
    FOR EACH ROW WHEN (NEW.action IN ('paused', 'resumed'))
    EXECUTE FUNCTION cdr_webhook.owe_owner_alert();
"""

#: Two senders at once (a slow one and the next minute's) add one failure-rate alert, not two.
_SCAN_LOCK_KEY = 0x0CD2_0A1E


@dataclasses.dataclass(frozen=True)
class Alert:
    """One alert owed to (or sent to) an endpoint's owner."""

    id: int
    endpoint: str
    kind: str
    reason: str | None
    actor: str | None
    at: dt.datetime
    status: str
    attempts: int
    next_attempt_at: dt.datetime
    last_attempt_at: dt.datetime | None
    last_error: str | None
    email_sent_at: dt.datetime | None
    webhook_sent_at: dt.datetime | None
    finished_at: dt.datetime | None


_COLUMNS = (
    "id, endpoint, kind, reason, actor, at, status, attempts, next_attempt_at, last_attempt_at, last_error, "
    "email_sent_at, webhook_sent_at, finished_at"
)


def add_failure_rate_alerts(
    conn: psycopg.Connection[Any],
    *,
    window: dt.timedelta,
    threshold: float,
    min_attempts: int,
    interval: dt.timedelta,
) -> list[Alert]:
    """
    Owe a ``failure_rate`` alert to each endpoint whose attempts over the last ``window`` (the health
    rollup's 5-minute buckets that began in it) number ``min_attempts`` or more and failed at a rate of
    ``threshold`` or more, unless it is paused (its pause alert says more) or got one in ``interval``.
    """
    with conn.transaction(), without_jit(conn), conn.cursor(row_factory=class_row(Alert)) as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCAN_LOCK_KEY,))
        return cur.execute(
            "INSERT INTO cdr_webhook.owner_alert (endpoint, kind, reason, actor) "
            "SELECT h.endpoint, 'failure_rate', format('%%s of %%s attempts failed in the last %%s min "
            "(%%s %%%%; owner_alert_failure_rate = %%s %%%%)', h.failures, h.attempts, %(minutes)s, "
            "round(100.0 * h.failures / h.attempts), round(100 * %(threshold)s::numeric, 1)), "
            "'cdr_webhook' "
            "FROM (SELECT endpoint, sum(attempts)::int AS attempts, sum(retried + failed)::int AS failures "
            "      FROM cdr_webhook.endpoint_health WHERE bucket >= now() - %(window)s "
            "      GROUP BY endpoint) AS h "
            "WHERE h.attempts >= %(min_attempts)s AND h.failures >= %(threshold)s * h.attempts "
            "AND NOT EXISTS (SELECT 1 FROM cdr_webhook.endpoint_state AS s "
            "                WHERE s.endpoint = h.endpoint AND s.paused) "
            "AND NOT EXISTS (SELECT 1 FROM cdr_webhook.owner_alert AS a WHERE a.endpoint = h.endpoint "
            "                AND a.kind = 'failure_rate' AND a.at > now() - %(interval)s) "
            f"ORDER BY h.endpoint RETURNING {_COLUMNS}",
            {
                "window": window,
                "minutes": round(window.total_seconds() / 60),
                "threshold": threshold,
                "min_attempts": min_attempts,
                "interval": interval,
            },
        ).fetchall()


def take_due(conn: psycopg.Connection[Any], *, limit: int) -> list[Alert]:
    """
    Lock and return up to ``limit`` pending alerts due now, oldest first; call inside a transaction,
    which keeps them from any other sender (``SKIP LOCKED``) until it ends.
    """
    with conn.cursor(row_factory=class_row(Alert)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM cdr_webhook.owner_alert "
            "WHERE status = 'pending' AND next_attempt_at <= now() ORDER BY next_attempt_at, id "
            "LIMIT %s FOR UPDATE SKIP LOCKED",
            (limit,),
        ).fetchall()


def last_sent(
    conn: psycopg.Connection[Any], endpoint: str, kind: str, *, within: dt.timedelta
) -> dt.datetime | None:
    """When the last alert of ``kind`` went to the endpoint's owner, if within ``within`` of now."""
    row = conn.execute(
        "SELECT max(finished_at) FROM cdr_webhook.owner_alert WHERE endpoint = %s AND kind = %s "
        "AND status = 'sent' AND finished_at > now() - %s",
        (endpoint, kind, within),
    ).fetchone()
    return row[0] if row else None


def last_state_told(conn: psycopg.Connection[Any], endpoint: str) -> str | None:
    """The kind (``paused`` or ``resumed``) of the last pause or resume alert the owner got, if any."""
    row = conn.execute(
        "SELECT kind FROM cdr_webhook.owner_alert WHERE endpoint = %s AND kind IN ('paused', 'resumed') "
        "AND status = 'sent' ORDER BY finished_at DESC, id DESC LIMIT 1",
        (endpoint,),
    ).fetchone()
    return row[0] if row else None


def superseded(conn: psycopg.Connection[Any], alert: Alert) -> bool:
    """Whether a later pause or resume of the same endpoint is owed or told (it says more than this one)."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM cdr_webhook.owner_alert WHERE endpoint = %s "
        "AND kind IN ('paused', 'resumed') AND id > %s)",
        (alert.endpoint, alert.id),
    ).fetchone()
    return bool(row and row[0])


def hold(conn: psycopg.Connection[Any], alert_id: int, *, until: dt.datetime) -> None:
    """Keep an alert owed until ``until`` (its kind went to the owner less than the interval ago)."""
    conn.execute("UPDATE cdr_webhook.owner_alert SET next_attempt_at = %s WHERE id = %s", (until, alert_id))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What an alert tells of its endpoint, read when it is sent."""

    attempts: int
    delivered: int
    failures: int
    queued: int
    failed: int
    consecutive_failures: int
    failing_since: dt.datetime | None
    first_failing_cdr_at: dt.datetime | None
    paused: bool


def snapshot(conn: psycopg.Connection[Any], endpoint: str, *, window: dt.timedelta) -> Snapshot:
    """
    The endpoint's counts for an alert: its attempts over ``window`` (the health rollup), its queued and
    failed rows, its failure streak, and the first failing CDR: the oldest (by ``created_at``) of its
    CDRs queued after a failed try, or failed for good since it began failing.
    """
    with without_jit(conn):
        row = conn.execute(
            "SELECT "
            " (SELECT COALESCE(sum(attempts), 0)::int FROM cdr_webhook.endpoint_health "
            "  WHERE endpoint = %(e)s AND bucket >= now() - %(window)s), "
            " (SELECT COALESCE(sum(delivered), 0)::int FROM cdr_webhook.endpoint_health "
            "  WHERE endpoint = %(e)s AND bucket >= now() - %(window)s), "
            " (SELECT count(*)::int FROM cdr_webhook.delivery WHERE endpoint = %(e)s AND status = 'queued'), "
            " (SELECT count(*)::int FROM cdr_webhook.delivery WHERE endpoint = %(e)s AND status = 'failed'), "
            " COALESCE(s.consecutive_failures, 0), COALESCE(s.attempts_failing_since, s.failing_since), "
            " LEAST("
            "  (SELECT min(cdr_created_at) FROM cdr_webhook.delivery "
            "   WHERE endpoint = %(e)s AND status = 'queued' AND attempts > 0), "
            "  (SELECT min(cdr_created_at) FROM cdr_webhook.delivery WHERE endpoint = %(e)s "
            "   AND status = 'failed' "
            "   AND last_attempt_at >= COALESCE(s.failing_since, now() - %(window)s))), "
            " COALESCE(s.paused, false) "
            "FROM (SELECT 1) AS one LEFT JOIN cdr_webhook.endpoint_state AS s ON s.endpoint = %(e)s",
            {"e": endpoint, "window": window},
        ).fetchone()
    assert row is not None
    attempts, delivered, queued, failed, streak, since, first, paused = row
    return Snapshot(attempts, delivered, attempts - delivered, queued, failed, streak, since, first, paused)


def mark_sent_channel(conn: psycopg.Connection[Any], alert_id: int, channel: str) -> None:
    """Record that one channel (``email`` or ``webhook``) took the alert: a retry skips it."""
    column = {"email": "email_sent_at", "webhook": "webhook_sent_at"}[channel]
    conn.execute(f"UPDATE cdr_webhook.owner_alert SET {column} = now() WHERE id = %s", (alert_id,))


def finish(
    conn: psycopg.Connection[Any],
    alert_id: int,
    status: str,
    *,
    message: dict[str, Any] | None = None,
    note: str | None = None,
) -> None:
    """End an alert: ``sent`` (with its message), ``suppressed`` or ``no_contact`` (with why, in ``note``)."""
    if status not in STATUSES[1:]:
        raise ValueError(f"an alert ends sent, suppressed or no_contact, not {status!r}")
    conn.execute(
        "UPDATE cdr_webhook.owner_alert SET status = %s, finished_at = now(), last_error = %s, "
        "message = COALESCE(%s, message) WHERE id = %s",
        (status, note[:MAX_ERROR_CHARS] if note else None, Jsonb(message) if message else None, alert_id),
    )


def failed_try(conn: psycopg.Connection[Any], alert_id: int, error: str, *, retry_in: dt.timedelta) -> None:
    """Record a failed send: the alert stays pending, tried again in ``retry_in``, its error shown."""
    conn.execute(
        "UPDATE cdr_webhook.owner_alert SET attempts = attempts + 1, last_attempt_at = now(), "
        "last_error = %s, next_attempt_at = now() + %s WHERE id = %s",
        (error[:MAX_ERROR_CHARS], retry_in, alert_id),
    )


def latest(conn: psycopg.Connection[Any]) -> dict[str, Alert]:
    """Each endpoint's latest alert (the Endpoints page), by endpoint."""
    with conn.cursor(row_factory=class_row(Alert)) as cur:
        rows = cur.execute(
            f"SELECT DISTINCT ON (endpoint) {_COLUMNS} FROM cdr_webhook.owner_alert "
            "ORDER BY endpoint, at DESC, id DESC"
        ).fetchall()
    return {row.endpoint: row for row in rows}


def pending(conn: psycopg.Connection[Any]) -> list[Alert]:
    """Every alert still owed, oldest first."""
    with conn.cursor(row_factory=class_row(Alert)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM cdr_webhook.owner_alert WHERE status = 'pending' ORDER BY at, id"
        ).fetchall()


def prune(conn: psycopg.Connection[Any], *, before: dt.datetime) -> int:
    """Delete the finished alerts older than ``before``; return how many (pending ones stay)."""
    return conn.execute(
        "DELETE FROM cdr_webhook.owner_alert WHERE status <> 'pending' AND at < %s", (before,)
    ).rowcount
