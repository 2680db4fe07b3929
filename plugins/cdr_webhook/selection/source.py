"""Reads of the source relation (``cdr_webhook_source`` by default): the 19 payload columns + created_at."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import DataError, sql
from psycopg.rows import dict_row
from psycopg.types import datetime as pg_datetime

from cdr_webhook.db import relation_identifier
from cdr_webhook.payload import SOURCE_COLUMNS, Ambiguous, Unloadable

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterable

    import psycopg
    from psycopg.abc import Buffer
    from psycopg.adapt import Loader


class SourceError(RuntimeError):
    """The source relation is missing or lacks a contract column; the message says how to fix it."""


def _tolerant(base: type[Loader]) -> type[Loader]:
    """Return a loader of ``base``'s type that yields :class:`Unloadable` where ``base`` raises DataError."""

    class Tolerant(base):  # type: ignore[misc, valid-type]
        def load(self, data: Buffer) -> Any:
            try:
                return super().load(data)
            except DataError:
                return Unloadable(bytes(data).decode("utf-8", "replace"))

    Tolerant.__name__ = Tolerant.__qualname__ = f"Tolerant{base.__name__}"
    return Tolerant


# Text-format loaders: fetch_rows reads with a text cursor. Date and time types are the ones whose
# PostgreSQL range (infinity, BC, beyond year 9999) Python cannot hold.
_TOLERANT_LOADERS: dict[str, type[Loader]] = {
    "date": _tolerant(pg_datetime.DateLoader),
    "timestamp": _tolerant(pg_datetime.TimestampLoader),
    "timestamptz": _tolerant(pg_datetime.TimestamptzLoader),
    "interval": _tolerant(pg_datetime.IntervalLoader),
}


def check_source(conn: psycopg.Connection[Any], relation: str) -> None:
    """Raise :class:`SourceError` unless ``relation`` exists and has every contract column."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (relation,)).fetchone()
    if not row or not row[0]:
        raise SourceError(
            f"source relation {relation!r} does not exist: create the view cdr_webhook_source over your "
            "CDR tables (see sql/reference_schema.sql) or set AIRFLOW__CDR_WEBHOOK__SOURCE_RELATION"
        )
    query = sql.SQL("SELECT * FROM {} LIMIT 0").format(relation_identifier(relation))
    with conn.cursor() as cur:
        cur.execute(query)
        present = {column.name for column in cur.description or ()}
    missing = [column for column in SOURCE_COLUMNS if column not in present]
    if missing:
        raise SourceError(f"source relation {relation!r} lacks the column(s) {', '.join(missing)}")


def fetch_rows(
    conn: psycopg.Connection[Any], relation: str, keys: Iterable[tuple[str, dt.datetime]]
) -> dict[str, dict[str, Any]]:
    """
    Return the source rows of the given ``(cdr_id, created_at)`` keys, by ``cdr_id``.

    A row matches on both: another row of the same cdr_id (a view without a key of its own may
    return duplicates) is not this CDR. Identical rows of one key count as one; rows of one key that
    differ come back as one row whose differing columns hold :class:`~cdr_webhook.payload.Ambiguous`.
    A value the driver cannot load (a date beyond Python's range) comes back as
    :class:`~cdr_webhook.payload.Unloadable`. :func:`~cdr_webhook.payload.build_payload` rejects
    both markers for that CDR alone. A CDR no longer in the source is absent from the result.
    """
    keys = list(keys)
    if not keys:
        return {}
    # The created_at range lets PostgreSQL use the index behind the view; the join picks the pairs.
    query = sql.SQL(
        "SELECT {columns} FROM {relation} AS s "
        "JOIN unnest(%(ids)s::text[], %(created)s::timestamptz[]) AS k(cdr_id, created_at) "
        "  ON s.cdr_id::text = k.cdr_id AND s.created_at = k.created_at "
        "WHERE s.created_at >= %(low)s AND s.created_at <= %(high)s"
    ).format(
        columns=sql.SQL(", ").join(sql.Identifier("s", column) for column in SOURCE_COLUMNS),
        relation=relation_identifier(relation),
    )
    params = {
        "low": min(created_at for _, created_at in keys),
        "high": max(created_at for _, created_at in keys),
        "ids": [cdr_id for cdr_id, _ in keys],
        "created": [created_at for _, created_at in keys],
    }
    with conn.cursor(row_factory=dict_row) as cur:
        for type_name, loader in _TOLERANT_LOADERS.items():
            cur.adapters.register_loader(type_name, loader)
        cur.execute(query, params)
        found: dict[str, list[dict[str, Any]]] = {}
        for row in cur.fetchall():
            found.setdefault(str(row["cdr_id"]), []).append(row)
    return {cdr_id: _one_row(relation, rows) for cdr_id, rows in found.items()}


def _one_row(relation: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the row of one CDR, with :class:`Ambiguous` in the columns its duplicate rows differ in."""
    first = rows[0]
    differing = [
        column for column in SOURCE_COLUMNS if any(not _same(first[column], row[column]) for row in rows)
    ]
    if not differing:
        return first
    problem = (
        f"cdr_id {str(first['cdr_id'])!r} appears in {len(rows)} rows of {relation} with created_at "
        f"{first['created_at']} that differ in column(s) {', '.join(differing)}: make the view return "
        "one row per CDR"
    )
    return {
        column: Ambiguous(tuple(row[column] for row in rows), problem) if column in differing else value
        for column, value in first.items()
    }


def _same(a: Any, b: Any) -> bool:
    # repr as well: NaN is not equal to itself, yet two NaN costs are the same value.
    return bool(a == b) or repr(a) == repr(b)


def distinct_clients(
    conn: psycopg.Connection[Any],
    relation: str,
    *,
    start: dt.datetime,
    end: dt.datetime,
    client_id: int | None = None,
) -> list[int | None]:
    """Return the client ids of the CDRs with ``start <= created_at < end`` (to route them)."""
    client_filter = sql.SQL(" AND client_id = %(client_id)s" if client_id is not None else "")
    query = sql.SQL(
        "SELECT DISTINCT client_id FROM {relation} "
        "WHERE created_at >= %(start)s AND created_at < %(end)s{client}"
    ).format(relation=relation_identifier(relation), client=client_filter)
    rows = conn.execute(query, {"start": start, "end": end, "client_id": client_id}).fetchall()
    return [row[0] for row in rows]


def cdr_ids_by_phone(
    conn: psycopg.Connection[Any],
    relation: str,
    phone_number: str,
    *,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    limit: int = 1000,
) -> list[str]:
    """
    Return the cdr_ids of the source rows dialled to ``phone_number`` (exactly), newest first.

    Fast only when the column behind the view's ``phone_number`` is indexed (the reference schema's
    ``dialer.cdr_phone_number_idx``): the Deliveries page's phone search reads the source this way,
    then the ledger by its key.
    """
    conditions = [sql.SQL("phone_number = %(phone)s")]
    if start is not None:
        conditions.append(sql.SQL("created_at >= %(start)s"))
    if end is not None:
        conditions.append(sql.SQL("created_at < %(end)s"))
    query = sql.SQL(
        "SELECT cdr_id::text FROM {relation} WHERE {where} ORDER BY created_at DESC LIMIT %(limit)s"
    ).format(relation=relation_identifier(relation), where=sql.SQL(" AND ").join(conditions))
    params = {"phone": phone_number, "start": start, "end": end, "limit": limit}
    return [row[0] for row in conn.execute(query, params).fetchall() if row[0] is not None]
