"""Reads of the ledger for the Deliveries page: the list (keyset pages), a delivery, attempts, completeness.

Every list query reads one index range in the list's order (newest first by ``cdr_created_at``,
``cdr_id``, ``endpoint``) and stops after a page: the next page starts after the last row shown
(keyset), never at an ``OFFSET``, so page 1,000 costs what page 1 does. The indexes are schema step 6.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg.rows import class_row

from cdr_webhook.db import relation_identifier, without_jit
from cdr_webhook.outcome import Claim, DeliveryStatus

if TYPE_CHECKING:
    from collections.abc import Sequence

    import psycopg

#: Ledger statuses, and "never queued": CDRs of the source with no ledger row (completeness only).
LIST_STATUSES = tuple(DeliveryStatus)
#: Days one completeness table may span: each day reads its CDRs from the source.
MAX_COMPLETENESS_DAYS = 31


class BadCursor(ValueError):
    """A page cursor that this module did not write (edited or truncated)."""


@dataclasses.dataclass(frozen=True)
class Filters:
    """What the list shows; every field optional. ``cdr_ids``: the CDRs a search found (id or phone)."""

    client_id: int | None = None
    endpoint: str | None = None
    status: str | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    cdr_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in LIST_STATUSES:
            raise ValueError(f"unknown status {self.status!r}: one of {', '.join(LIST_STATUSES)}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"the date range ends ({self.end}) before it starts ({self.start})")


@dataclasses.dataclass(frozen=True)
class Delivery(Claim):
    """One ledger row as the page shows it: a CDR to one endpoint (a claim's row), and its last attempt."""

    http_status: int | None
    error: str | None
    response_excerpt: str | None
    latency_ms: int | None
    dag_id: str | None
    run_id: str | None
    map_index: int | None
    last_attempt_at: dt.datetime | None
    delivered_at: dt.datetime | None
    updated_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class AttemptRow:
    """One row of a delivery's attempt history (schema step 6 keeps every attempt)."""

    attempt: int
    status: str
    http_status: int | None
    error: str | None
    response_excerpt: str | None
    latency_ms: int | None
    run_id: str | None
    map_index: int | None
    at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Page:
    """One page of the list; ``next_cursor`` is None on the last page."""

    rows: list[Delivery]
    next_cursor: str | None


@dataclasses.dataclass(frozen=True)
class DayCount:
    """Completeness of one client's day: its CDRs in the source against their ledger rows."""

    client_id: int | None
    day: dt.date
    in_source: int
    delivered: int = 0
    failed: int = 0
    skipped: int = 0
    queued: int = 0
    never_queued: int = 0

    @property
    def complete(self) -> bool:
        return self.failed == self.queued == self.never_queued == 0


_COLUMNS = sql.SQL(
    "cdr_id, endpoint, client_id, cdr_created_at, status, attempts, http_status, error, response_excerpt, "
    "latency_ms, dag_id, run_id, map_index, last_attempt_at, delivered_at, updated_at"
)


def encode_cursor(cdr_created_at: dt.datetime, cdr_id: str, endpoint: str) -> str:
    """The cursor of the page after the row with this sort key: the key itself, URL-safe."""
    key = [cdr_created_at.isoformat(), cdr_id, endpoint]
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str, str]:
    """Return the sort key a cursor holds; :class:`BadCursor` if it is not one."""
    try:
        created, cdr_id, endpoint = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return dt.datetime.fromisoformat(created), str(cdr_id), str(endpoint)
    except (ValueError, TypeError) as err:
        raise BadCursor(f"not a page cursor: {cursor[:40]!r}") from err


def list_deliveries(
    conn: psycopg.Connection[Any], filters: Filters, *, cursor: str | None = None, limit: int = 50
) -> Page:
    """Return one page of ledger rows matching ``filters``, newest first, after ``cursor``."""
    params: dict[str, Any] = {
        "client_id": filters.client_id,
        "endpoint": filters.endpoint or None,
        "status": filters.status or None,
    }
    conditions: list[sql.Composable] = [
        sql.SQL("{} = {}").format(sql.Identifier(column), sql.Placeholder(column))
        for column, value in params.items()
        if value is not None
    ]
    if filters.start is not None:
        conditions.append(sql.SQL("cdr_created_at >= %(start)s"))
        params["start"] = filters.start
    if filters.end is not None:
        conditions.append(sql.SQL("cdr_created_at < %(end)s"))
        params["end"] = filters.end
    if filters.cdr_ids is not None:
        conditions.append(sql.SQL("cdr_id = ANY(%(cdr_ids)s)"))
        params["cdr_ids"] = list(filters.cdr_ids)
    params["limit"] = limit + 1
    if cursor:
        # The row comparison is an index condition on the list indexes' (cdr_created_at, cdr_id).
        conditions.append(sql.SQL("(cdr_created_at, cdr_id, endpoint) < (%(c_at)s, %(c_id)s, %(c_ep)s)"))
        params["c_at"], params["c_id"], params["c_ep"] = decode_cursor(cursor)
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
    query = sql.SQL(
        "SELECT {columns} FROM cdr_webhook.delivery{where} "
        "ORDER BY cdr_created_at DESC, cdr_id DESC, endpoint DESC LIMIT %(limit)s"
    ).format(columns=_COLUMNS, where=where)
    with conn.cursor(row_factory=class_row(Delivery)) as cur:
        rows = cur.execute(query, params).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(
        rows=rows,
        next_cursor=encode_cursor(rows[-1].cdr_created_at, rows[-1].cdr_id, rows[-1].endpoint)
        if more
        else None,
    )


def get_delivery(conn: psycopg.Connection[Any], *, cdr_id: str, endpoint: str) -> Delivery | None:
    """Return one ledger row, or None."""
    query = sql.SQL("SELECT {columns} FROM cdr_webhook.delivery WHERE cdr_id = %s AND endpoint = %s").format(
        columns=_COLUMNS
    )
    with conn.cursor(row_factory=class_row(Delivery)) as cur:
        return cur.execute(query, (cdr_id, endpoint)).fetchone()


def get_deliveries(conn: psycopg.Connection[Any], keys: Sequence[tuple[str, str]]) -> list[Delivery]:
    """Return the ledger rows of these ``(cdr_id, endpoint)`` keys (those that exist)."""
    query = sql.SQL(
        "SELECT {columns} FROM cdr_webhook.delivery AS d "
        "JOIN unnest(%s::text[], %s::text[]) AS k(cdr_id, endpoint) USING (cdr_id, endpoint) "
        "ORDER BY run_id, map_index"
    ).format(columns=sql.SQL(", ").join(sql.Identifier("d", c) for c in _column_names()))
    with conn.cursor(row_factory=class_row(Delivery)) as cur:
        return cur.execute(query, ([k[0] for k in keys], [k[1] for k in keys])).fetchall()


def chunk_tasks(
    conn: psycopg.Connection[Any], *, dag_id: str, tasks: Sequence[tuple[str, int]]
) -> set[tuple[str, int]]:
    """Which of these ``(run_id, map_index)`` tasks send more than one CDR (a chunk)."""
    if not tasks:
        return set()
    rows = conn.execute(
        "SELECT d.run_id, d.map_index FROM cdr_webhook.delivery AS d "
        "JOIN unnest(%s::text[], %s::int[]) AS t(run_id, map_index) USING (run_id, map_index) "
        "WHERE d.dag_id = %s GROUP BY d.run_id, d.map_index HAVING count(*) > 1",
        ([t[0] for t in tasks], [t[1] for t in tasks], dag_id),
    ).fetchall()
    return {(run_id, map_index) for run_id, map_index in rows}


def _column_names() -> list[str]:
    return [field.name for field in dataclasses.fields(Delivery)]


def task_deliveries(
    conn: psycopg.Connection[Any], *, dag_id: str, run_id: str, map_index: int
) -> list[Delivery]:
    """Return the ledger rows a task instance owns (one per CDR it sends)."""
    query = sql.SQL(
        "SELECT {columns} FROM cdr_webhook.delivery WHERE dag_id = %s AND run_id = %s AND map_index = %s "
        "ORDER BY cdr_created_at, cdr_id LIMIT 1000"
    ).format(columns=_COLUMNS)
    with conn.cursor(row_factory=class_row(Delivery)) as cur:
        return cur.execute(query, (dag_id, run_id, map_index)).fetchall()


def attempts(conn: psycopg.Connection[Any], *, cdr_id: str, endpoint: str) -> list[AttemptRow]:
    """Return every recorded attempt of one delivery, the latest first."""
    with conn.cursor(row_factory=class_row(AttemptRow)) as cur:
        return cur.execute(
            "SELECT attempt, status, http_status, error, response_excerpt, latency_ms, run_id, map_index, at "
            "FROM cdr_webhook.delivery_attempt WHERE cdr_id = %s AND endpoint = %s ORDER BY attempt DESC",
            (cdr_id, endpoint),
        ).fetchall()


def completeness(
    conn: psycopg.Connection[Any],
    *,
    relation: str,
    start: dt.date,
    end: dt.date,
    client_id: int | None = None,
) -> list[DayCount]:
    """
    Return, per client and UTC day in ``[start, end)``, the source's CDRs against the ledger's rows.

    ``never_queued`` counts source rows with no ledger row under their ``cdr_id`` (an anti-join on the
    ledger's key); the status counts are ledger rows (one per CDR and endpoint). Both read only the
    days asked for, through the source's and the ledger's created_at indexes.
    """
    if end <= start:
        raise ValueError(f"the completeness range ends ({end}) on or before it starts ({start})")
    if (end - start).days > MAX_COMPLETENESS_DAYS:
        raise ValueError(f"at most {MAX_COMPLETENESS_DAYS} days at a time, not {(end - start).days}")
    low = dt.datetime.combine(start, dt.time(), dt.UTC)
    high = dt.datetime.combine(end, dt.time(), dt.UTC)
    client = sql.SQL(" AND s.client_id = %(client_id)s" if client_id is not None else "")
    params = {"low": low, "high": high, "client_id": client_id}
    source_query = sql.SQL(
        "SELECT s.client_id, (s.created_at AT TIME ZONE 'UTC')::date AS day, count(*) AS in_source, "
        "  count(*) FILTER (WHERE NOT EXISTS ("
        "    SELECT 1 FROM cdr_webhook.delivery AS d WHERE d.cdr_id = s.cdr_id::text)) AS never_queued "
        "FROM {relation} AS s WHERE s.created_at >= %(low)s AND s.created_at < %(high)s{client} "
        "GROUP BY 1, 2"
    ).format(relation=relation_identifier(relation), client=client)
    ledger_query = sql.SQL(
        "SELECT s.client_id, (s.cdr_created_at AT TIME ZONE 'UTC')::date AS day, s.status, count(*) "
        "FROM cdr_webhook.delivery AS s "
        "WHERE s.cdr_created_at >= %(low)s AND s.cdr_created_at < %(high)s{client} GROUP BY 1, 2, 3"
    ).format(client=client)
    days: dict[tuple[int | None, dt.date], dict[str, int]] = {}
    # The anti-join's estimate over a week of CDRs makes PostgreSQL compile it (JIT), which then takes
    # most of its time (docs/benchmarks.md); the query itself needs no compiling.
    with without_jit(conn):
        for client_key, day, in_source, never in conn.execute(source_query, params).fetchall():
            days[(client_key, day)] = {"in_source": in_source, "never_queued": never}
        for client_key, day, status, count in conn.execute(ledger_query, params).fetchall():
            days.setdefault((client_key, day), {"in_source": 0})[status] = count
    return [
        DayCount(client_id=key[0], day=key[1], **counts)
        for key, counts in sorted(days.items(), key=lambda item: (-item[0][1].toordinal(), item[0][0] or -1))
    ]
