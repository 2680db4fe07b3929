"""The queue: source CDRs entered into the ledger as ``queued``, and a run's fair share of them.

A run *enqueues* what its window holds and the ledger lacks (:func:`enqueue_new`; ``ON CONFLICT DO
NOTHING``, so a CDR is queued once), then *assigns* itself at most ``max_cdrs_per_run`` of the queue,
round robin across endpoints, oldest first (:func:`assign`; ``FOR UPDATE SKIP LOCKED``, so two runs
never own one CDR). What it could not take waits for the next run: nothing is dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg.rows import class_row

from cdr_webhook.db import relation_identifier, without_jit
from cdr_webhook.ledger.claims import CLAIM_COLUMNS, Claim

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Mapping, Sequence

    import psycopg

    from cdr_webhook.selection.routing import Route
    from cdr_webhook.window import Scan, Window


#: Ledger key prefix for source rows whose cdr_id is NULL: they are recorded (skipped), never sent.
NULL_CDR_ID_PREFIX = "null-cdr-id:"


#: The longest cdr_id that is sent: Airflow shows it as the mapped task's name, a String(250) column.
MAX_CDR_ID_LENGTH = 200


#: Ledger key prefix (+ md5 of the cdr_id) of longer cdr_ids: recorded (skipped), never sent.
LONG_CDR_ID_PREFIX = "long-cdr-id:"


_SYNTHETIC_KEYS = (NULL_CDR_ID_PREFIX + "%", LONG_CDR_ID_PREFIX + "%")


_SHOWN_ID_CHARS = 60
#: Characters a reason shows as ``?``: controls, bidi marks and line separators (a PostgreSQL regex),
#: so that a reason stays one line that reads as written (Python's reasons escape them: payload.shown).
_UNSAFE_IN_REASON = r"[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]"


_THROTTLE_LOCK_KEY = 0x0CD2_3EB2  # advisory lock (with the endpoint's hash) around a throttled count


#: The source rows of ``[start, end)`` (and ``condition``) without a ledger row of their own
#: ``created_at``, under their ledger ``key``: the first stage of an anti-join on the ledger. Each
#: row is one probe of the ledger's created_at index, in the order of the source's own index (so
#: on neighbouring pages), not one of its primary key (random pages, a read each on a big ledger).
#: A row can have its ledger row under another created_at (a cdr_id the source has twice), so the
#: caller still probes the primary key, for the few rows left. MATERIALIZED
#: keeps the planner from probing the primary key first.
_UNRECORDED = sql.SQL(
    "unrecorded AS MATERIALIZED ("
    "  SELECT {key} AS cdr_id, s.client_id, s.created_at FROM {relation} AS s "
    "  WHERE s.created_at >= %(start)s AND s.created_at < %(end)s AND {condition} "
    "  AND NOT EXISTS (SELECT 1 FROM cdr_webhook.delivery AS r"
    "    WHERE r.cdr_created_at = s.created_at AND r.cdr_id = {key}))"
)


def late_clients(
    conn: psycopg.Connection[Any], *, relation: str, start: dt.datetime, end: dt.datetime
) -> list[int | None]:
    """
    Return the clients of source rows with ``start <= created_at < end`` that have no ledger row.

    The reconciliation's first step, over one slice (:func:`reconcile_slice`): an anti-join in two
    stages (see :data:`_UNRECORDED`), the ledger's primary key probed only for the rows the first
    stage leaves. Rows with a NULL cdr_id (keyed by the whole row) are a branch of their own: the
    whole row in the common branch would make the view compute every column of every row (its
    phonebook arrays too). It runs without parallel workers (see :func:`without_jit`).
    """
    key = sql.SQL(
        "CASE WHEN length(s.cdr_id::text) > %(max_length)s THEN {long_prefix} || md5(s.cdr_id::text) "
        "ELSE s.cdr_id::text END"
    ).format(long_prefix=sql.Literal(LONG_CDR_ID_PREFIX))
    query = sql.SQL(
        "WITH {unrecorded} "
        "SELECT DISTINCT client_id FROM ("
        "  SELECT u.client_id FROM unrecorded AS u "
        "  WHERE NOT EXISTS (SELECT 1 FROM cdr_webhook.delivery AS d WHERE d.cdr_id = u.cdr_id)"
        "  UNION ALL "
        "  SELECT s.client_id FROM {relation} AS s "
        "  WHERE s.created_at >= %(start)s AND s.created_at < %(end)s AND s.cdr_id IS NULL "
        "  AND NOT EXISTS (SELECT 1 FROM cdr_webhook.delivery AS d"
        "    WHERE d.cdr_id = {null_prefix} || md5(s::text))"
        ") AS late"
    ).format(
        unrecorded=_UNRECORDED.format(
            key=key,
            relation=relation_identifier(relation),
            condition=sql.SQL("s.cdr_id IS NOT NULL"),
        ),
        relation=relation_identifier(relation),
        null_prefix=sql.Literal(NULL_CDR_ID_PREFIX),
    )
    params = {"start": start, "end": end, "max_length": MAX_CDR_ID_LENGTH}
    with without_jit(conn, parallel=False):
        return [row[0] for row in conn.execute(query, params).fetchall()]


#: :func:`enqueue_new`'s source rows of the window (and its client), each joined to its route.
_ROUTED = sql.SQL(
    "FROM {relation} AS s "
    "JOIN unnest(%(clients)s::bigint[], %(endpoints)s::text[], %(statuses)s::text[], %(errors)s::text[]) "
    "  AS r(client_id, endpoint, status, error) ON r.client_id IS NOT DISTINCT FROM s.client_id "
    "WHERE s.created_at >= %(start)s AND s.created_at < %(end)s{client} "
)

#: :func:`enqueue_new`'s queueing of the window's unrecorded CDRs, the earliest row of each cdr_id.
#: The routes are materialized: joined by IS NOT DISTINCT FROM (no hash join), the unnest would run
#: again for every new row.
_QUEUE_NEW = sql.SQL(
    "WITH {unrecorded}, "
    "routes AS MATERIALIZED (SELECT * FROM unnest(%(clients)s::bigint[], %(endpoints)s::text[], "
    "  %(statuses)s::text[], %(errors)s::text[]) AS r(client_id, endpoint, status, error)) "
    "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, error) "
    "SELECT DISTINCT ON (u.cdr_id) u.cdr_id, r.endpoint, u.client_id, u.created_at, r.status, r.error "
    "FROM unrecorded AS u JOIN routes AS r ON r.client_id IS NOT DISTINCT FROM u.client_id "
    "WHERE NOT EXISTS (SELECT 1 FROM cdr_webhook.delivery AS d WHERE d.cdr_id = u.cdr_id) "
    "ORDER BY u.cdr_id, u.created_at "
    "ON CONFLICT (cdr_id, endpoint) DO NOTHING RETURNING status"
)

#: :func:`enqueue_new`'s record of rows whose cdr_id is NULL: skipped, keyed by the whole row.
_RECORD_NULL_IDS = sql.SQL(
    "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, error) "
    "SELECT {prefix} || md5(s::text), r.endpoint, s.client_id, s.created_at, 'skipped', "
    "'column cdr_id is NULL in ' || %(relation)s || ' (row created_at ' || s.created_at || ')' "
    "{routed}AND s.cdr_id IS NULL "
    "ON CONFLICT (cdr_id, endpoint) DO NOTHING"
)

#: :func:`enqueue_new`'s record of rows whose cdr_id is too long to send: skipped, keyed by its md5.
_RECORD_LONG_IDS = sql.SQL(
    "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, error) "
    "SELECT {prefix} || md5(s.cdr_id::text), r.endpoint, s.client_id, s.created_at, 'skipped', "
    "format('column cdr_id = %%s is %%s characters long in %%s (row created_at %%s): at most %%s fit "
    "Airflow''s mapped task names and the ledger; make the view return a shorter id', "
    "quote_literal(regexp_replace(left(s.cdr_id::text, {shown}), {unsafe}, '?', 'g') || '...'), "
    "length(s.cdr_id::text), %(relation)s::text, "
    "s.created_at, %(max_length)s::int) "
    "{routed}AND s.cdr_id IS NOT NULL AND length(s.cdr_id::text) > %(max_length)s "
    "ON CONFLICT (cdr_id, endpoint) DO NOTHING"
)


def enqueue_new(
    conn: psycopg.Connection[Any],
    *,
    relation: str,
    routes: Mapping[int | None, Route],
    start: dt.datetime,
    end: dt.datetime,
    client_id: int | None = None,
    parallel: bool = True,
) -> int:
    """
    Queue every source CDR with ``start <= created_at < end`` that has no ledger row yet.

    ``routes`` gives each client's endpoint (every client of the window must be in it); a client
    routed to be skipped gets its CDRs recorded as ``skipped`` with the route's reason. Routing
    applies to new CDRs only: a CDR with a ledger row for any endpoint (say the default one, before
    its client got a connection of its own) is not queued again; a redelivery is a deliberate
    ``policy: all`` run, which re-queues the existing rows. A cdr_id is one CDR: when the source has
    it in several rows, the row with the earliest ``created_at`` is queued (a later one is not sent
    again). A row whose ``cdr_id`` is NULL, or longer than :data:`MAX_CDR_ID_LENGTH`, cannot be sent;
    it is recorded as ``skipped`` under a short key derived from the row, so it is accounted for once
    however often the window is read. Returns how many CDRs were queued. ``parallel=False``: without
    parallel workers (a reconciliation slice, see :func:`without_jit`).
    """
    client_filter = sql.SQL(" AND s.client_id = %(client_id)s" if client_id is not None else "")
    params = {
        "start": start,
        "end": end,
        "client_id": client_id,
        "relation": relation,
        "max_length": MAX_CDR_ID_LENGTH,
        **_route_columns(routes),
    }
    relation_id = relation_identifier(relation)
    routed = _ROUTED.format(relation=relation_id, client=client_filter)
    # Lengths are checked before any cdr_id reaches an index: a btree entry holds ~2.7 kB at most.
    queue = _QUEUE_NEW.format(
        unrecorded=_UNRECORDED.format(
            key=sql.SQL("s.cdr_id::text"),
            relation=relation_id,
            condition=sql.SQL(
                "s.cdr_id IS NOT NULL AND length(s.cdr_id::text) <= %(max_length)s{client}"
            ).format(client=client_filter),
        )
    )
    record_null_ids = _RECORD_NULL_IDS.format(prefix=sql.Literal(NULL_CDR_ID_PREFIX), routed=routed)
    record_long_ids = _RECORD_LONG_IDS.format(
        prefix=sql.Literal(LONG_CDR_ID_PREFIX),
        shown=sql.Literal(_SHOWN_ID_CHARS),
        unsafe=sql.Literal(_UNSAFE_IN_REASON),
        routed=routed,
    )
    with without_jit(conn, parallel=parallel):
        statuses = [row[0] for row in conn.execute(queue, params).fetchall()]
        conn.execute(record_null_ids, params)
        conn.execute(record_long_ids, params)
    _keep_statistics(conn, changed=len(statuses))
    return statuses.count("queued")


def _route_columns(routes: Mapping[int | None, Route]) -> dict[str, list[Any]]:
    """The routes as the parallel arrays :data:`_ROUTED` and :data:`_QUEUE_NEW` unnest."""
    clients = list(routes)
    return {
        "clients": clients,
        "endpoints": [routes[c].endpoint for c in clients],
        "statuses": ["skipped" if routes[c].skip_reason else "queued" for c in clients],
        "errors": [routes[c].skip_reason for c in clients],
    }


def _finished_in(window: Window, statuses: Sequence[str]) -> tuple[sql.Composed, dict[str, Any]]:
    """The condition and parameters of "rows of the window (and its client) in ``statuses``"."""
    client_filter = sql.SQL(" AND client_id = %(client_id)s" if window.client_id is not None else "")
    condition = sql.SQL(
        "cdr_created_at >= %(start)s AND cdr_created_at < %(end)s AND status = ANY(%(statuses)s){client}"
    ).format(client=client_filter)
    params = {
        "start": window.start,
        "end": window.end,
        "statuses": list(statuses),
        "client_id": window.client_id,
    }
    return condition, params


#: Queued rows added at once above which the ledger's statistics are refreshed before the claim.
_ANALYZE_AFTER_ROWS = 1000


def _keep_statistics(conn: psycopg.Connection[Any], *, changed: int) -> None:
    """
    Refresh the ledger's planner statistics after a burst of queued rows, in this transaction.

    The claim that follows picks each endpoint's next row through the partial index of queued rows;
    with statistics from before the burst (a new ledger, or a backlog that autovacuum has not
    analysed yet) the planner may sort every queued row of an endpoint for each pick instead, a
    cost that grows with the backlog. ANALYZE samples a bounded number of rows and sees this
    transaction's own inserts.
    """
    if changed >= _ANALYZE_AFTER_ROWS:
        conn.execute("ANALYZE cdr_webhook.delivery")


def finished_endpoints(
    conn: psycopg.Connection[Any], *, window: Window, statuses: Sequence[str]
) -> list[str]:
    """Return the endpoints of the window's ledger rows in ``statuses`` (those a requeue would touch)."""
    condition, params = _finished_in(window, statuses)
    query = sql.SQL("SELECT DISTINCT endpoint FROM cdr_webhook.delivery WHERE {}").format(condition)
    return sorted(row[0] for row in conn.execute(query, params).fetchall())


def requeue(
    conn: psycopg.Connection[Any],
    *,
    window: Window,
    statuses: Sequence[str],
    exclude_endpoints: Sequence[str] = (),
) -> int:
    """
    Put finished ledger rows of the window back in the queue, unowned (a deliberate redelivery).

    Rows of ``exclude_endpoints`` (endpoints whose connection does not exist, such as the "no
    endpoint" rows of ``unrouted_clients = skip``) stay as they are: there is nowhere to send them.
    """
    condition, params = _finished_in(window, statuses)
    query = sql.SQL(
        "UPDATE cdr_webhook.delivery SET status = 'queued', dag_id = NULL, run_id = NULL, map_index = NULL, "
        "updated_at = now() "
        "WHERE {condition} AND NOT cdr_id LIKE ANY(%(synthetic)s) AND endpoint <> ALL(%(excluded)s)"
    ).format(condition=condition)
    params |= {"synthetic": list(_SYNTHETIC_KEYS), "excluded": list(exclude_endpoints)}
    requeued = conn.execute(query, params).rowcount
    _keep_statistics(conn, changed=requeued)
    return requeued


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
    in_flight AS (
        -- Counted for the throttled endpoints only (their live claims held by other runs).
        SELECT t.endpoint, GREATEST(0, t.cap - (SELECT count(*) FROM cdr_webhook.delivery AS o
            WHERE o.endpoint = t.endpoint AND o.status = 'queued' AND o.run_id IS NOT NULL
              AND (o.dag_id, o.run_id) IS DISTINCT FROM (%(dag_id)s, %(run_id)s)
              AND o.updated_at >= now() - make_interval(secs => %(timeout)s))) AS room
        FROM unnest(%(throttled)s::text[], %(caps)s::bigint[]) AS t(endpoint, cap)
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
    of paused endpoints stay queued, in order, until their endpoint is resumed. ``throttled`` caps an
    endpoint's CDRs in flight: its queued rows that other live runs own, plus this run's new claims.
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


def queued_backlog(conn: psycopg.Connection[Any], *, at_most: int | None = None) -> int:
    """
    Return how many queued CDRs no run owns (the work waiting for later runs), up to ``at_most``.

    Every run logs it; an exact count of a big backlog would visit every row of it, every run, so
    it stops at ``at_most`` (:data:`BACKLOG_COUNT_LIMIT` by default).
    """
    # "IS TRUE" keeps the planner from intersecting the queued rows with every unowned row of the
    # ledger (delivery_run_idx, built whole before the LIMIT can stop anything): it reads the queued
    # rows' index until it has counted at_most.
    with without_jit(conn):
        row = conn.execute(
            "SELECT count(*) FROM (SELECT FROM cdr_webhook.delivery "
            "WHERE status = 'queued' AND (run_id IS NULL) IS TRUE LIMIT %s) AS waiting",
            (BACKLOG_COUNT_LIMIT if at_most is None else at_most,),
        ).fetchone()
    return row[0] if row else 0
