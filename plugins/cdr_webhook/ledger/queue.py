"""The queue's intake: source CDRs entered into the ledger as ``queued`` once each; finished ones again.

A run *enqueues* what its window holds and the ledger lacks (:func:`enqueue_new`; ``ON CONFLICT DO
NOTHING``, so a CDR is queued once; the reconciliation finds late commits with the same anti-join),
a backfill *requeues* finished rows by its policy (:func:`requeue`); the run then takes its share of
the queue (:mod:`cdr_webhook.ledger.assignment`). What it could not take waits: nothing is dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import sql

from cdr_webhook.db import relation_identifier, without_jit
from cdr_webhook.ledger.keys import (
    LONG_CDR_ID_PREFIX,
    MAX_CDR_ID_LENGTH,
    NULL_KEY,
    SHOWN_ID_CHARS,
    SYNTHETIC_KEYS,
    UNSAFE_IN_REASON,
)

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Mapping, Sequence

    import psycopg

    from cdr_webhook.routing import Route
    from cdr_webhook.window import Window


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
    stage leaves. Rows with a NULL cdr_id (keyed by :data:`NULL_KEY`) are a branch of their own: their
    key in the common branch would make the view compute its columns for every row. It runs without
    parallel workers (see :func:`without_jit`).
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
        "    WHERE d.cdr_id = {null_key})"
        ") AS late"
    ).format(
        unrecorded=_UNRECORDED.format(
            key=key,
            relation=relation_identifier(relation),
            condition=sql.SQL("s.cdr_id IS NOT NULL"),
        ),
        relation=relation_identifier(relation),
        null_key=NULL_KEY,
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

#: :func:`enqueue_new`'s record of rows whose cdr_id is NULL: skipped, under :data:`NULL_KEY`.
_RECORD_NULL_IDS = sql.SQL(
    "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, error) "
    "SELECT {key}, r.endpoint, s.client_id, s.created_at, 'skipped', "
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
    record_null_ids = _RECORD_NULL_IDS.format(key=NULL_KEY, routed=routed)
    record_long_ids = _RECORD_LONG_IDS.format(
        prefix=sql.Literal(LONG_CDR_ID_PREFIX),
        shown=sql.Literal(SHOWN_ID_CHARS),
        unsafe=sql.Literal(UNSAFE_IN_REASON),
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
    params |= {"synthetic": list(SYNTHETIC_KEYS), "excluded": list(exclude_endpoints)}
    requeued = conn.execute(query, params).rowcount
    _keep_statistics(conn, changed=requeued)
    return requeued
