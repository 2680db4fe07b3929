"""The delivery ledger and the watermark, in schema ``cdr_webhook`` of the CDR database.

One ``delivery`` row per (CDR, endpoint) is both the outbox and the record: a run *enqueues* the
CDRs it selects (``status = 'queued'``, no owner), then *assigns* at most ``max_cdrs_per_run`` of
them to itself; its mapped tasks record every attempt. Claims are atomic (``ON CONFLICT DO
NOTHING`` and ``FOR UPDATE SKIP LOCKED``), so two runs never own one CDR, and what a run could not
take waits in the ledger for the next run: nothing is dropped. The tables are made by
:func:`cdr_webhook.schema.migrate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

from psycopg import pq, sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from cdr_webhook.source import relation_identifier

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterator, Mapping, Sequence

    import psycopg

    from cdr_webhook.routing import Route
    from cdr_webhook.window import Scan, Window

STATUSES = ("queued", "delivered", "failed", "skipped")
EXCERPT_BYTES = 2048
#: Ledger key prefix for source rows whose cdr_id is NULL: they are recorded (skipped), never sent.
NULL_CDR_ID_PREFIX = "null-cdr-id:"
#: The longest cdr_id that is sent: Airflow shows it as the mapped task's name, a String(250) column.
MAX_CDR_ID_LENGTH = 200
#: Ledger key prefix (+ md5 of the cdr_id) of longer cdr_ids: recorded (skipped), never sent.
LONG_CDR_ID_PREFIX = "long-cdr-id:"
_SYNTHETIC_KEYS = (NULL_CDR_ID_PREFIX + "%", LONG_CDR_ID_PREFIX + "%")
_SHOWN_ID_CHARS = 60
_THROTTLE_LOCK_KEY = 0x0CD2_3EB2  # advisory lock (with the endpoint's hash) around a throttled count


@dataclasses.dataclass(frozen=True)
class Claim:
    """A ledger row a run owns: one CDR to POST to one endpoint."""

    cdr_id: str
    endpoint: str
    client_id: int | None
    cdr_created_at: dt.datetime
    status: str
    attempts: int


class ClaimLost(RuntimeError):
    """The CDR's ledger row is owned by another live run (or is gone); this task must not POST it."""


@dataclasses.dataclass(frozen=True)
class NotStarted:
    """Why a CDR's attempt was not started: the reason, the row's status, and whether this run owns it."""

    reason: str
    status: str | None
    this_run: bool = False


_CLAIM_COLUMNS = sql.SQL("d.cdr_id, d.endpoint, d.client_id, d.cdr_created_at, d.status, d.attempts")


def owned_claims(conn: psycopg.Connection[Any], *, dag_id: str, run_id: str) -> list[Claim]:
    """
    Return the sendable CDRs a run claimed for its current request (its select task was cleared).

    Claims and the request are written in one transaction, so they share its ``now()``: rows the
    run claimed for an earlier request (before a reprocessing backfill gave it new Params) are older.
    """
    query = sql.SQL(
        "SELECT {columns} FROM cdr_webhook.delivery AS d "
        "JOIN cdr_webhook.run_selection AS r ON r.dag_id = d.dag_id AND r.run_id = d.run_id "
        "WHERE d.dag_id = %s AND d.run_id = %s AND d.status <> 'skipped' AND d.claimed_at >= r.selected_at "
        "ORDER BY d.cdr_created_at, d.cdr_id"
    ).format(columns=_CLAIM_COLUMNS)
    with conn.cursor(row_factory=class_row(Claim)) as cur:
        return cur.execute(query, (dag_id, run_id)).fetchall()


def recorded_request(conn: psycopg.Connection[Any], *, dag_id: str, run_id: str) -> dict[str, Any] | None:
    """Return what the run asked for when it last claimed CDRs, or None if it never did."""
    row = conn.execute(
        "SELECT request FROM cdr_webhook.run_selection WHERE dag_id = %s AND run_id = %s", (dag_id, run_id)
    ).fetchone()
    return row[0] if row else None


def record_request(
    conn: psycopg.Connection[Any], *, dag_id: str, run_id: str, request: dict[str, Any]
) -> None:
    """Remember what the run asked for (in the transaction of its claims)."""
    conn.execute(
        "INSERT INTO cdr_webhook.run_selection (dag_id, run_id, request) VALUES (%s, %s, %s) "
        "ON CONFLICT (dag_id, run_id) DO UPDATE SET request = EXCLUDED.request, selected_at = now()",
        (dag_id, run_id, Jsonb(request)),
    )


def lock_watermark(conn: psycopg.Connection[Any], relation: str) -> dt.datetime | None:
    """Return the stored watermark, locking its row until the transaction ends (None before run 1)."""
    conn.execute(
        "INSERT INTO cdr_webhook.watermark (source_relation) VALUES (%s) "
        "ON CONFLICT (source_relation) DO NOTHING",
        (relation,),
    )
    row = conn.execute(
        "SELECT created_at FROM cdr_webhook.watermark WHERE source_relation = %s FOR UPDATE", (relation,)
    ).fetchone()
    return row[0] if row else None


def advance_watermark(conn: psycopg.Connection[Any], relation: str, created_at: dt.datetime) -> None:
    """Move the watermark forward to ``created_at`` (never backward)."""
    # GREATEST ignores NULL, so the first run's NULL watermark simply becomes created_at.
    conn.execute(
        "UPDATE cdr_webhook.watermark SET created_at = GREATEST(created_at, %s), updated_at = now() "
        "WHERE source_relation = %s",
        (created_at, relation),
    )


def note_scan_start(conn: psycopg.Connection[Any], relation: str, start: dt.datetime) -> None:
    """Remember where the very first scan began: reconciliation never reaches before it."""
    conn.execute(
        "UPDATE cdr_webhook.watermark SET scanned_from = %s "
        "WHERE source_relation = %s AND scanned_from IS NULL",
        (start, relation),
    )


def due_reconciliation(
    conn: psycopg.Connection[Any], relation: str, *, now: dt.datetime, interval_seconds: int
) -> dt.datetime | None:
    """
    Return where scans began if a reconciliation is due (recording it as run at ``now``), else None.

    Call it with the watermark locked (:func:`lock_watermark`): one run at a time decides.
    """
    row = conn.execute(
        "UPDATE cdr_webhook.watermark SET reconciled_at = %(now)s "
        "WHERE source_relation = %(relation)s AND scanned_from IS NOT NULL "
        "AND (reconciled_at IS NULL OR reconciled_at <= %(now)s - make_interval(secs => %(secs)s)) "
        "RETURNING scanned_from",
        {"now": now, "relation": relation, "secs": interval_seconds},
    ).fetchone()
    return row[0] if row else None


def reconcile_slice(
    conn: psycopg.Connection[Any],
    relation: str,
    *,
    start: dt.datetime,
    before: dt.datetime,
    max_cdrs: int,
) -> tuple[dt.datetime, dt.datetime] | None:
    """
    Return the next slice ``[low, high)`` of the reconciliation's sweep, and move the cursor past it.

    A sweep checks ``[start, before)`` as it was when the sweep began, oldest first, one slice per
    reconciliation: a slice ends after about ``max_cdrs`` ledger rows (the index on their created_at
    counts them; the source is a view, counting its rows means joining them), so a reconciliation's
    work is bounded however many CDRs a day brings. When the cursor reaches the sweep's end, or the
    window has moved past it, the next slice begins a new sweep at ``start``. Returns None when the
    window is empty. Call it with the watermark locked (:func:`lock_watermark`).
    """
    row = conn.execute(
        "SELECT reconcile_cursor, reconcile_until FROM cdr_webhook.watermark WHERE source_relation = %s",
        (relation,),
    ).fetchone()
    cursor, until = row if row else (None, None)
    if until is not None:
        until = min(until, before)
    if cursor is None or until is None or max(cursor, start) >= until:
        cursor, until = start, before  # a new sweep
    low = max(cursor, start)
    if low >= until:
        return None
    # The created_at of the ledger row max_cdrs rows on: the slice ends there (or at the sweep's end).
    found = conn.execute(
        "SELECT cdr_created_at FROM cdr_webhook.delivery "
        "WHERE cdr_created_at >= %(low)s AND cdr_created_at < %(until)s "
        "ORDER BY cdr_created_at OFFSET %(rows)s LIMIT 1",
        {"low": low, "until": until, "rows": max_cdrs},
    ).fetchone()
    high = found[0] if found else until
    if high <= low:  # more than max_cdrs rows at one instant: the slice takes them all
        found = conn.execute(
            "SELECT min(cdr_created_at) FROM cdr_webhook.delivery "
            "WHERE cdr_created_at > %(low)s AND cdr_created_at < %(until)s",
            {"low": low, "until": until},
        ).fetchone()
        high = found[0] if found and found[0] is not None else until
    conn.execute(
        "UPDATE cdr_webhook.watermark SET reconcile_cursor = %s, reconcile_until = %s "
        "WHERE source_relation = %s",
        (high, until, relation),
    )
    return low, high


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


@contextlib.contextmanager
def without_jit(conn: psycopg.Connection[Any], *, parallel: bool = True) -> Iterator[None]:
    """
    Run the block's statements without JIT compilation (in a transaction: the setting is local to it).

    PostgreSQL compiles a statement whose estimated cost passes ``jit_above_cost``. Reading a day of
    CDRs by index is estimated that high, yet runs in tens of milliseconds; compiling it took
    40 to 200 ms here, more than the query. With ``parallel=False``, also without parallel workers
    (``max_parallel_workers_per_gather`` 0): a reconciliation slice of 10,000 CDRs took a third
    longer with them (their start-up), and at 20,000 the planner's parallel plan joined the source
    view by a scan of its biggest table (0.5 s). The settings are back as they were when the block
    ends (on an error, when the transaction or savepoint it aborted is rolled back).
    """
    if conn.info.transaction_status != pq.TransactionStatus.INTRANS:
        with conn.transaction(), without_jit(conn, parallel=parallel):
            yield
        return
    names = ["jit"] if parallel else ["jit", "max_parallel_workers_per_gather"]
    values = {"jit": "off", "max_parallel_workers_per_gather": "0"}
    was = [_set_local(conn, name, values[name]) for name in names]
    yield
    for name, value in zip(names, was, strict=True):
        _set_local(conn, name, value)


def _set_local(conn: psycopg.Connection[Any], name: str, value: str) -> str:
    """Set a setting for the rest of the transaction; return what it was."""
    row = conn.execute("SELECT current_setting(%s), set_config(%s, %s, true)", (name, name, value)).fetchone()
    assert row is not None
    return str(row[0])


#: The source rows of ``[start, end)`` (and ``condition``) without a ledger row of their own
#: ``created_at``, under their ledger ``key``: the first stage of an anti-join on the ledger. Each
#: row is one probe of the ledger's created_at index, in the order of the source's own index (so
#: on neighbouring pages), not one of its primary key (random pages: 0.5 s for a day of 83,000
#: CDRs measured at 5,000,000). A row can have its ledger row under another created_at (a cdr_id the
#: source has twice), so the caller still probes the primary key, for the few rows left. MATERIALIZED
#: keeps the planner from probing the primary key first.
_UNRECORDED = sql.SQL(
    "unrecorded AS MATERIALIZED ("
    "  SELECT {key} AS cdr_id, s.client_id, s.created_at FROM {relation} AS s "
    "  WHERE s.created_at >= %(start)s AND s.created_at < %(end)s AND {condition} "
    "  AND NOT EXISTS (SELECT 1 FROM cdr_webhook.delivery AS r"
    "    WHERE r.cdr_created_at = s.created_at AND r.cdr_id = {key}))"
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
    ``policy: all`` run, which re-queues the existing rows. A cdr_id is
    one CDR: when the source has it in several rows, the row with the earliest ``created_at`` is
    queued (a later one is not sent again). A row whose ``cdr_id`` is NULL, or longer than
    :data:`MAX_CDR_ID_LENGTH`, cannot be sent; it is recorded as ``skipped`` under a short key
    derived from the row, so it is accounted for once however often the window is read. Returns how
    many CDRs were queued. ``parallel=False``: without parallel workers (a reconciliation slice, see
    :func:`without_jit`).
    """
    client_filter = sql.SQL(" AND s.client_id = %(client_id)s" if client_id is not None else "")
    clients = list(routes)
    params = {
        "start": start,
        "end": end,
        "client_id": client_id,
        "relation": relation,
        "clients": clients,
        "endpoints": [routes[c].endpoint for c in clients],
        "statuses": ["skipped" if routes[c].skip_reason else "queued" for c in clients],
        "errors": [routes[c].skip_reason for c in clients],
        "max_length": MAX_CDR_ID_LENGTH,
    }
    routed = sql.SQL(
        "FROM {relation} AS s "
        "JOIN unnest(%(clients)s::bigint[], %(endpoints)s::text[], %(statuses)s::text[], %(errors)s::text[]) "
        "  AS r(client_id, endpoint, status, error) ON r.client_id IS NOT DISTINCT FROM s.client_id "
        "WHERE s.created_at >= %(start)s AND s.created_at < %(end)s{client} "
    ).format(relation=relation_identifier(relation), client=client_filter)
    # Lengths are checked before any cdr_id reaches an index: a btree entry holds ~2.7 kB at most.
    queue = sql.SQL(
        "WITH {unrecorded}, "
        # Materialized: joined by IS NOT DISTINCT FROM (no hash join), the unnest would run again for
        # every new row (11 ms for 57 rows and 300 clients).
        "routes AS MATERIALIZED (SELECT * FROM unnest(%(clients)s::bigint[], %(endpoints)s::text[], "
        "  %(statuses)s::text[], %(errors)s::text[]) AS r(client_id, endpoint, status, error)) "
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, error) "
        "SELECT DISTINCT ON (u.cdr_id) u.cdr_id, r.endpoint, u.client_id, u.created_at, r.status, r.error "
        "FROM unrecorded AS u JOIN routes AS r ON r.client_id IS NOT DISTINCT FROM u.client_id "
        "WHERE NOT EXISTS (SELECT 1 FROM cdr_webhook.delivery AS d WHERE d.cdr_id = u.cdr_id) "
        "ORDER BY u.cdr_id, u.created_at "
        "ON CONFLICT (cdr_id, endpoint) DO NOTHING RETURNING status"
    ).format(
        unrecorded=_UNRECORDED.format(
            key=sql.SQL("s.cdr_id::text"),
            relation=relation_identifier(relation),
            condition=sql.SQL(
                "s.cdr_id IS NOT NULL AND length(s.cdr_id::text) <= %(max_length)s{client}"
            ).format(client=client_filter),
        )
    )
    record_null_ids = sql.SQL(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, error) "
        "SELECT {prefix} || md5(s::text), r.endpoint, s.client_id, s.created_at, 'skipped', "
        "'column cdr_id is NULL in ' || %(relation)s || ' (row created_at ' || s.created_at || ')' "
        "{routed}AND s.cdr_id IS NULL "
        "ON CONFLICT (cdr_id, endpoint) DO NOTHING"
    ).format(prefix=sql.Literal(NULL_CDR_ID_PREFIX), routed=routed)
    record_long_ids = sql.SQL(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, error) "
        "SELECT {prefix} || md5(s.cdr_id::text), r.endpoint, s.client_id, s.created_at, 'skipped', "
        "format('column cdr_id = %%s is %%s characters long in %%s (row created_at %%s): at most %%s fit "
        "Airflow''s mapped task names and the ledger; make the view return a shorter id', "
        "quote_literal(left(s.cdr_id::text, {shown}) || '...'), length(s.cdr_id::text), %(relation)s::text, "
        "s.created_at, %(max_length)s::int) "
        "{routed}AND s.cdr_id IS NOT NULL AND length(s.cdr_id::text) > %(max_length)s "
        "ON CONFLICT (cdr_id, endpoint) DO NOTHING"
    ).format(prefix=sql.Literal(LONG_CDR_ID_PREFIX), shown=sql.Literal(_SHOWN_ID_CHARS), routed=routed)
    with without_jit(conn, parallel=parallel):
        statuses = [row[0] for row in conn.execute(queue, params).fetchall()]
        conn.execute(record_null_ids, params)
        conn.execute(record_long_ids, params)
    _keep_statistics(conn, changed=len(statuses))
    return statuses.count("queued")


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
    analysed yet) the planner may sort every queued row of an endpoint for each pick instead: 6 s
    for a claim of 500 out of 50,000 measured here, 30 ms once analysed. ANALYZE samples a bounded
    number of rows and sees this transaction's own inserts.
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
    eligible = [
        sql.SQL(
            "d.status = 'queued' AND d.endpoint <> ALL(%(paused)s) "
            "AND (d.run_id IS NULL OR d.updated_at < now() - make_interval(secs => %(timeout)s))"
        )
    ]
    # The rows after an endpoint's last pick: its window's lower bound holds already, and its upper
    # bound is a row comparison that only the queued rows' index by endpoint serves. A plain range
    # would let the planner probe the queued rows' created_at index instead (their costs tie, by the
    # statistics sample), reading the other endpoints' rows of the window each time: 40-100 ms at 5M.
    following = [eligible[0]]
    if window is not None:
        eligible.append(sql.SQL(" AND d.cdr_created_at >= %(start)s AND d.cdr_created_at < %(end)s"))
        following.append(sql.SQL(" AND (d.endpoint, d.cdr_created_at) < (t.endpoint, %(end)s)"))
    if client_id is not None:
        eligible.append(sql.SQL(" AND d.client_id = %(client_id)s"))
        following.append(sql.SQL(" AND d.client_id = %(client_id)s"))
    # FOR UPDATE is not allowed in a recursive query: pick first, then lock what was picked in
    # a second step whose WHERE repeats the eligibility, which READ COMMITTED re-checks on the latest
    # version of each row. Picking twice the limit leaves room for rows a concurrent run locked.
    query = sql.SQL(
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
    ).format(eligible=sql.Composed(eligible), following=sql.Composed(following), columns=_CLAIM_COLUMNS)
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


#: :func:`queued_backlog` counts up to this many queued CDRs.
BACKLOG_COUNT_LIMIT = 10_000


def queued_backlog(conn: psycopg.Connection[Any], *, at_most: int | None = None) -> int:
    """
    Return how many queued CDRs no run owns (the work waiting for later runs), up to ``at_most``.

    Every run logs it; an exact count of a big backlog would visit every row of it, every run
    (227 ms for 97,000 queued rows measured at 1,000,000 CDRs), so it stops at ``at_most``
    (:data:`BACKLOG_COUNT_LIMIT` by default).
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


def prune(conn: psycopg.Connection[Any], *, before: dt.datetime, limit: int = 10_000) -> int:
    """
    Delete at most ``limit`` finished ledger rows (delivered, failed, skipped) of CDRs created before
    ``before``, and the run records selected before it; return how many ledger rows went.

    Queued rows are never deleted: they are work still to do. Bounded so that one run's select step
    stays short; the next runs go on where it stopped.
    """
    with conn.transaction():
        deleted = conn.execute(
            "DELETE FROM cdr_webhook.delivery WHERE ctid IN ("
            "  SELECT ctid FROM cdr_webhook.delivery WHERE cdr_created_at < %s AND status <> 'queued' "
            "  LIMIT %s)",
            (before, limit),
        ).rowcount
        conn.execute(
            "DELETE FROM cdr_webhook.run_selection AS r WHERE r.selected_at < %s AND NOT EXISTS ("
            "  SELECT 1 FROM cdr_webhook.delivery AS d WHERE d.dag_id = r.dag_id AND d.run_id = r.run_id)",
            (before,),
        )
    return deleted


def mark_skipped(conn: psycopg.Connection[Any], claim: Claim, reason: str) -> None:
    """Record that a CDR will not be sent, and why."""
    mark_skipped_many(conn, [(claim, reason)])


def mark_skipped_many(conn: psycopg.Connection[Any], skipped: Sequence[tuple[Claim, str]]) -> None:
    """Record that these CDRs will not be sent, each with its reason, in one statement."""
    if not skipped:
        return
    conn.execute(
        "UPDATE cdr_webhook.delivery AS d SET status = 'skipped', error = s.reason, updated_at = now() "
        "FROM unnest(%s::text[], %s::text[], %s::text[]) AS s(cdr_id, endpoint, reason) "
        "WHERE d.cdr_id = s.cdr_id AND d.endpoint = s.endpoint",
        (
            [claim.cdr_id for claim, _ in skipped],
            [claim.endpoint for claim, _ in skipped],
            [reason for _, reason in skipped],
        ),
    )


def release(conn: psycopg.Connection[Any], claim: Claim, *, reason: str | None = None) -> None:
    """Give a CDR back to the queue, unowned: the next run takes it, in order; ``reason``: why it waits."""
    release_many(conn, [claim], reason=reason)


def release_many(
    conn: psycopg.Connection[Any], claims: Sequence[Claim], *, reason: str | None = None
) -> None:
    """Give CDRs back to the queue, unowned, in one statement (see :func:`release`)."""
    if not claims:
        return
    conn.execute(
        "UPDATE cdr_webhook.delivery AS d SET status = 'queued', dag_id = NULL, run_id = NULL, "
        "map_index = NULL, error = COALESCE(%s, d.error), updated_at = now() "
        "FROM unnest(%s::text[], %s::text[]) AS c(cdr_id, endpoint) "
        "WHERE d.cdr_id = c.cdr_id AND d.endpoint = c.endpoint",
        (reason, [claim.cdr_id for claim in claims], [claim.endpoint for claim in claims]),
    )


def start_attempt(
    conn: psycopg.Connection[Any],
    *,
    cdr_id: str,
    endpoint: str,
    dag_id: str,
    run_id: str,
    map_index: int,
    claim_timeout_seconds: int,
) -> Claim:
    """
    Confirm this task may POST the CDR now, recording the task as its owner; return the row.

    A task may send when its own run owns the row (its first try, a retry, or a cleared try, which
    re-sends on purpose even a delivered CDR), or when the row is queued and no live run owns it
    (unowned, or its owner's claim went stale). It raises :class:`ClaimLost` when another run owns
    the row: that run is delivering it, or delivered it already, and only a clear of *its* task
    re-sends it. Starting an attempt also refreshes every queued claim of this run, so claims of a
    live run never go stale while its other tasks wait for a worker.
    """
    claims, lost = start_attempts(
        conn,
        cdr_ids=[cdr_id],
        endpoint=endpoint,
        dag_id=dag_id,
        run_id=run_id,
        map_index=map_index,
        claim_timeout_seconds=claim_timeout_seconds,
    )
    if claims:
        return claims[0]
    raise ClaimLost(lost[cdr_id].reason)


def start_attempts(
    conn: psycopg.Connection[Any],
    *,
    cdr_ids: Sequence[str],
    endpoint: str,
    dag_id: str,
    run_id: str,
    map_index: int,
    claim_timeout_seconds: int,
    own_statuses: Sequence[str] = STATUSES,
) -> tuple[list[Claim], dict[str, NotStarted]]:
    """
    Start an attempt on each of ``cdr_ids`` this task may POST now, in one statement (see
    :func:`start_attempt` for who may send); return the claims (oldest first) and, for every other
    CDR, why it is not sent.

    ``own_statuses``: the statuses of its own run's rows that are sent again. A chunk's retry sends
    only ``queued`` rows: its delivered and failed CDRs stay as they are.
    """
    query = sql.SQL(
        "UPDATE cdr_webhook.delivery AS d SET dag_id = %(dag_id)s, run_id = %(run_id)s, "
        "map_index = %(map_index)s, status = 'queued', updated_at = now() "
        "WHERE d.cdr_id = ANY(%(cdr_ids)s) AND d.endpoint = %(endpoint)s AND ("
        "  (d.dag_id = %(dag_id)s AND d.run_id = %(run_id)s AND d.status = ANY(%(own)s)) "
        "  OR (d.status = 'queued' AND ("
        "    d.run_id IS NULL OR d.updated_at < now() - make_interval(secs => %(timeout)s)))) "
        "RETURNING {columns}"
    ).format(columns=_CLAIM_COLUMNS)
    params = {
        "cdr_ids": list(cdr_ids),
        "endpoint": endpoint,
        "dag_id": dag_id,
        "run_id": run_id,
        "map_index": map_index,
        "timeout": claim_timeout_seconds,
        "own": list(own_statuses),
    }
    with conn.transaction(), conn.cursor(row_factory=class_row(Claim)) as cur:
        claims = cur.execute(query, params).fetchall()
    if claims:
        keep_claims_alive(conn, dag_id=dag_id, run_id=run_id, claim_timeout_seconds=claim_timeout_seconds)
    claims.sort(key=lambda claim: (claim.cdr_created_at, claim.cdr_id))
    taken = {claim.cdr_id for claim in claims}
    missing = [cdr_id for cdr_id in dict.fromkeys(cdr_ids) if cdr_id not in taken]
    if not missing:
        return claims, {}
    owners = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT cdr_id, dag_id, run_id, map_index, status FROM cdr_webhook.delivery "
            "WHERE cdr_id = ANY(%s) AND endpoint = %s",
            (missing, endpoint),
        ).fetchall()
    }
    lost = {}
    for cdr_id in missing:
        owner = owners.get(cdr_id)
        if owner is None:
            lost[cdr_id] = NotStarted(f"CDR {cdr_id!r} has no ledger row for endpoint {endpoint!r}", None)
            continue
        other_dag, other_run, other_index, status = owner
        if (other_dag, other_run) == (dag_id, run_id):
            lost[cdr_id] = NotStarted(
                f"CDR {cdr_id!r} is {status} (an earlier try of this run)", status, True
            )
            continue
        task = f"run {other_run!r}" + (f", map index {other_index}" if other_index is not None else "")
        if status == "queued":
            reason = f"CDR {cdr_id!r} for endpoint {endpoint!r} is being delivered by {task}"
        else:
            reason = (
                f"CDR {cdr_id!r} for endpoint {endpoint!r} belongs to {task} (status {status}): clear that "
                "task to send it again"
            )
        lost[cdr_id] = NotStarted(reason, status)
    return claims, lost


def keep_claims_alive(
    conn: psycopg.Connection[Any], *, dag_id: str, run_id: str, claim_timeout_seconds: int
) -> None:
    """
    Mark the run's queued claims as alive, so that none goes stale while the run still works (every
    try's start, and a long chunk between its batches, call it).

    Its own statement, after the try's claim has committed, and ``SKIP LOCKED``: tries of one run
    running at once would otherwise lock each other's rows in opposite orders (a deadlock). Only rows
    untouched for a quarter of the claim timeout are rewritten, so a run's tries do not rewrite all
    its claims on every try.
    """
    conn.execute(
        "UPDATE cdr_webhook.delivery AS d SET updated_at = now() FROM ("
        "  SELECT cdr_id, endpoint FROM cdr_webhook.delivery "
        "  WHERE dag_id = %(dag_id)s AND run_id = %(run_id)s AND status = 'queued' "
        "    AND updated_at < now() - make_interval(secs => %(age)s) "
        "  FOR UPDATE SKIP LOCKED) AS alive "
        "WHERE d.cdr_id = alive.cdr_id AND d.endpoint = alive.endpoint",
        {"dag_id": dag_id, "run_id": run_id, "age": claim_timeout_seconds / 4},
    )


@dataclasses.dataclass(frozen=True)
class AttemptRecord:
    """One attempt's result, as its CDR's ledger row records it."""

    claim: Claim
    status: str
    http_status: int | None
    error: str | None
    response_excerpt: str | None
    latency_ms: int | None


def record_attempt(
    conn: psycopg.Connection[Any],
    claim: Claim,
    *,
    status: str,
    http_status: int | None,
    error: str | None,
    response_excerpt: str | None,
    latency_ms: int | None,
) -> None:
    """Record one attempt's result on the CDR's row: its count, status, HTTP status, error and latency."""
    record_attempts(conn, [AttemptRecord(claim, status, http_status, error, response_excerpt, latency_ms)])


def record_attempts(conn: psycopg.Connection[Any], records: Sequence[AttemptRecord]) -> None:
    """
    Record attempts on their CDRs' rows in one statement (an UPDATE of each row, as one attempt's is).

    Each row gets one more attempt, its status, HTTP status, error, response excerpt and latency.
    """
    for record in records:
        if record.status not in STATUSES:
            raise ValueError(f"unknown ledger status {record.status!r}")
    if not records:
        return
    columns = {
        "cdr_ids": [r.claim.cdr_id for r in records],
        "endpoints": [r.claim.endpoint for r in records],
        "statuses": [r.status for r in records],
        "http_statuses": [r.http_status for r in records],
        "errors": [r.error for r in records],
        "excerpts": [r.response_excerpt for r in records],
        "latencies": [r.latency_ms for r in records],
    }
    with conn.transaction():
        conn.execute(
            "UPDATE cdr_webhook.delivery AS d SET attempts = d.attempts + 1, status = a.status, "
            "http_status = a.http_status, error = a.error, response_excerpt = a.excerpt, "
            "latency_ms = a.latency_ms, last_attempt_at = now(), updated_at = now(), "
            "delivered_at = CASE WHEN a.status = 'delivered' THEN now() ELSE d.delivered_at END "
            "FROM unnest(%(cdr_ids)s::text[], %(endpoints)s::text[], %(statuses)s::text[], "
            "  %(http_statuses)s::int[], %(errors)s::text[], %(excerpts)s::text[], %(latencies)s::int[]) "
            "  AS a(cdr_id, endpoint, status, http_status, error, excerpt, latency_ms) "
            "WHERE d.cdr_id = a.cdr_id AND d.endpoint = a.endpoint",
            columns,
        )
