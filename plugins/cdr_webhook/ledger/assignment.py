"""A run's fair share of the queue: at most ``max_cdrs_per_run`` queued CDRs, round robin across the
endpoints, oldest first, with a failing endpoint held to its in-flight limit across live runs
(``FOR UPDATE SKIP LOCKED``, so two runs never own one CDR); and the size of what still waits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg.rows import class_row

from cdr_webhook.db import without_jit
from cdr_webhook.ledger.claims import CLAIM_COLUMNS, Claim

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import psycopg

    from cdr_webhook.window import Scan, Window

_THROTTLE_LOCK_KEY = 0x0CD2_3EB2  # advisory lock (with the endpoint's hash) around a throttled count


#: :func:`assign`'s statement; ``{eligible}`` and ``{following}`` are its conditions on a row.
#: FOR UPDATE is not allowed in a recursive query: pick first, then lock what was picked in
#: a second step whose WHERE repeats the eligibility, which READ COMMITTED re-checks on the latest
#: version of each row. Picking twice the limit leaves room for rows a concurrent run locked.
_ASSIGN = sql.SQL(
    """
    WITH RECURSIVE queued_endpoints AS (
        -- The distinct endpoints of queued rows, one index probe each (a loose index scan).
        (SELECT endpoint FROM cdr_webhook.delivery WHERE status = 'queued' ORDER BY endpoint LIMIT 1)
        UNION ALL
        SELECT (SELECT n.endpoint FROM cdr_webhook.delivery AS n
                WHERE n.status = 'queued' AND n.endpoint > q.endpoint ORDER BY n.endpoint LIMIT 1)
        FROM queued_endpoints AS q WHERE q.endpoint IS NOT NULL
    ),
    held AS (
        -- The throttled endpoints' CDRs that other live runs own: those in flight, and those of
        -- them waiting for a retry (tried already: Airflow keeps their run going until the retry).
        SELECT t.endpoint, t.cap, count(o.*) AS owned, count(o.*) FILTER (WHERE o.attempts > 0) AS retrying
        FROM unnest(%(throttled)s::text[], %(caps)s::bigint[]) AS t(endpoint, cap)
        LEFT JOIN cdr_webhook.delivery AS o ON o.endpoint = t.endpoint AND o.status = 'queued'
            AND o.run_id IS NOT NULL AND (o.dag_id, o.run_id) IS DISTINCT FROM (%(dag_id)s, %(run_id)s)
            AND o.updated_at >= now() - make_interval(secs => %(timeout)s)
        GROUP BY t.endpoint, t.cap
    ),
    in_flight AS (
        -- None while another run waits to retry one of its CDRs (no second run is to be held by
        -- its retries), else up to its cap, less what other runs have in flight.
        SELECT endpoint, CASE WHEN retrying > 0 THEN 0 ELSE GREATEST(0, cap - owned) END AS room FROM held
    ),
    quota AS (
        SELECT q.endpoint, COALESCE(LEAST(%(limit)s, f.room), %(limit)s) AS quota
        FROM queued_endpoints AS q LEFT JOIN in_flight AS f ON f.endpoint = q.endpoint
        WHERE q.endpoint IS NOT NULL AND q.endpoint <> ALL(%(paused)s)
    ),
    turns AS (
        -- Round robin one turn at a time: each endpoint's next eligible row after the one it gave
        -- in the last turn, one index probe each, however long its backlog.
        SELECT q.endpoint, q.quota, c.cdr_id, c.cdr_created_at, 1 AS turn
        FROM quota AS q CROSS JOIN LATERAL (
            SELECT d.cdr_id, d.cdr_created_at FROM cdr_webhook.delivery AS d
            WHERE d.endpoint = q.endpoint AND {eligible}
            ORDER BY d.cdr_created_at, d.cdr_id LIMIT 1
        ) AS c
        WHERE q.quota > 0
        UNION ALL
        SELECT t.endpoint, t.quota, c.cdr_id, c.cdr_created_at, t.turn + 1
        FROM turns AS t CROSS JOIN LATERAL (
            SELECT d.cdr_id, d.cdr_created_at FROM cdr_webhook.delivery AS d
            WHERE d.endpoint = t.endpoint AND (d.cdr_created_at, d.cdr_id) > (t.cdr_created_at, t.cdr_id)
              AND {following}
            ORDER BY d.cdr_created_at, d.cdr_id LIMIT 1
        ) AS c
        WHERE t.turn < t.quota
    ),
    candidates AS (
        -- Turns come out whole and in order, and one holds a row per endpoint at most: these rows
        -- hold every turn the pick below reaches, and the recursion stops once they are read.
        SELECT cdr_id, endpoint, cdr_created_at, turn FROM turns
        LIMIT 2 * %(limit)s + (SELECT count(*) FROM quota)
    ),
    picked AS (
        SELECT cdr_id, endpoint, cdr_created_at, turn FROM candidates
        ORDER BY turn, cdr_created_at, cdr_id LIMIT 2 * %(limit)s
    ),
    locked AS (
        -- The whole key of the queued rows' index (a row's cdr_created_at never changes): a probe
        -- by endpoint and cdr_id alone would read every queued row of the endpoint.
        SELECT d.cdr_id, d.endpoint, p.turn FROM cdr_webhook.delivery AS d
        JOIN picked AS p ON p.cdr_id = d.cdr_id AND p.endpoint = d.endpoint
          AND p.cdr_created_at = d.cdr_created_at
        WHERE {eligible}
        ORDER BY p.turn, d.cdr_created_at, d.cdr_id LIMIT %(limit)s
        FOR UPDATE OF d SKIP LOCKED
    ),
    claimed AS (
        UPDATE cdr_webhook.delivery AS d SET dag_id = %(dag_id)s, run_id = %(run_id)s, map_index = NULL,
            claimed_at = now(), updated_at = now()
        FROM locked AS l WHERE d.cdr_id = l.cdr_id AND d.endpoint = l.endpoint
        RETURNING {columns}, l.turn
    )
    SELECT cdr_id, endpoint, client_id, cdr_created_at, status, attempts FROM claimed
    ORDER BY turn, cdr_created_at, cdr_id
    """
)


def assign(
    conn: psycopg.Connection[Any],
    *,
    dag_id: str,
    run_id: str,
    limit: int,
    claim_timeout_seconds: int,
    window: Window | Scan | None = None,
    client_id: int | None = None,
    paused_endpoints: Sequence[str] = (),
    throttled: Mapping[str, int] | None = None,
) -> list[Claim]:
    """
    Take ownership of at most ``limit`` queued CDRs, shared round robin across endpoints; return them.

    Each endpoint's oldest CDR comes first, then each one's second, and so on: an endpoint with a big
    backlog cannot take a whole run from the others. The claims come back in that order (turn, then
    created_at), the order of the mapped tasks, so every endpoint gets early map indexes.

    Eligible are queued rows with no owner, and *stale* claims: queued rows whose owner has not
    touched them for ``claim_timeout_seconds`` (its run died, or its task was marked failed by hand
    before it could record an outcome). ``SKIP LOCKED`` keeps concurrent runs' picks disjoint. CDRs
    of paused endpoints stay queued, in order, until their endpoint is resumed. ``throttled`` names
    the failing endpoints (their last attempt failed) and caps each one's CDRs in flight, across
    every live run; and while another live run waits to retry one of its CDRs, a run takes none of
    them: its retries, which keep their run going, hold one run at a time, never every run the
    other endpoints need.
    """
    throttled = dict(throttled or {})
    eligible, following = _assign_conditions(window=window, client_id=client_id)
    query = _ASSIGN.format(eligible=eligible, following=following, columns=CLAIM_COLUMNS)
    params = {
        "dag_id": dag_id,
        "run_id": run_id,
        "timeout": claim_timeout_seconds,
        "limit": limit,
        "start": window.start if window is not None else None,
        "end": window.end if window is not None else None,
        "client_id": client_id,
        "paused": list(paused_endpoints),
        "throttled": list(throttled),
        "caps": list(throttled.values()),
    }
    # Two runs counting one throttled endpoint's claims at once could both fill its cap: they take
    # turns (until their transaction ends; the select step's is short).
    for endpoint in sorted(throttled):
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_THROTTLE_LOCK_KEY, endpoint))
    with conn.cursor(row_factory=class_row(Claim)) as cur:
        return cur.execute(query, params).fetchall()


def _assign_conditions(
    *, window: Window | Scan | None, client_id: int | None
) -> tuple[sql.Composed, sql.Composed]:
    """:func:`assign`'s conditions on a row: ``eligible`` for an endpoint's first pick, then ``following``."""
    eligible = [
        sql.SQL(
            "d.status = 'queued' AND d.endpoint <> ALL(%(paused)s) "
            "AND (d.run_id IS NULL OR d.updated_at < now() - make_interval(secs => %(timeout)s))"
        )
    ]
    # The rows after an endpoint's last pick: its window's lower bound holds already, and its upper
    # bound is a row comparison that only the queued rows' index by endpoint serves. A plain range
    # would let the planner probe the queued rows' created_at index instead (their costs tie, by the
    # statistics sample), reading the other endpoints' rows of the window for every pick.
    following = [eligible[0]]
    if window is not None:
        eligible.append(sql.SQL(" AND d.cdr_created_at >= %(start)s AND d.cdr_created_at < %(end)s"))
        following.append(sql.SQL(" AND (d.endpoint, d.cdr_created_at) < (t.endpoint, %(end)s)"))
    if client_id is not None:
        eligible.append(sql.SQL(" AND d.client_id = %(client_id)s"))
        following.append(sql.SQL(" AND d.client_id = %(client_id)s"))
    return sql.Composed(eligible), sql.Composed(following)


#: :func:`queued_backlog` counts up to this many queued CDRs.
BACKLOG_COUNT_LIMIT = 10_000


def queued_backlog(conn: psycopg.Connection[Any]) -> int:
    """
    Return how many queued CDRs no run owns (the work waiting for later runs), up to
    :data:`BACKLOG_COUNT_LIMIT`.

    Every run logs it; an exact count of a big backlog would visit every row of it, every run, so
    it stops there.
    """
    # "IS TRUE" keeps the planner from intersecting the queued rows with every unowned row of the
    # ledger (delivery_run_idx, built whole before the LIMIT can stop anything): it reads the queued
    # rows' index until it has counted the limit.
    with without_jit(conn):
        row = conn.execute(
            "SELECT count(*) FROM (SELECT FROM cdr_webhook.delivery "
            "WHERE status = 'queued' AND (run_id IS NULL) IS TRUE LIMIT %s) AS waiting",
            (BACKLOG_COUNT_LIMIT,),
        ).fetchone()
    return row[0] if row else 0
