"""Reads of the source relation (``cdr_webhook_source`` by default): the 19 payload columns + created_at."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import DataError, sql
from psycopg.rows import dict_row
from psycopg.types import datetime as pg_datetime
from psycopg.types import json as pg_json

from cdr_webhook.db import relation_identifier, relation_name
from cdr_webhook.payload import OUT_OF_RANGE, PAYLOAD_FIELDS, SOURCE_COLUMNS, Ambiguous, Unloadable
from cdr_webhook.source_types import check_types, suggest_cast

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterable

    from psycopg.abc import Buffer
    from psycopg.adapt import Loader


class SourceError(RuntimeError):
    """The source relation cannot carry the payload (absent, a column missing or mistyped, its query
    failing); the message says how to fix it."""


def _tolerant(base: type[Loader], problem: str) -> type[Loader]:
    """
    Return a loader of ``base``'s type that yields :class:`Unloadable` with ``problem`` where ``base``
    raises DataError, or RecursionError (Python's JSON reader on nesting PostgreSQL accepts).
    """

    class Tolerant(base):  # type: ignore[misc, valid-type]
        def load(self, data: Buffer) -> Any:
            try:
                return super().load(data)
            except (DataError, RecursionError):
                return Unloadable(bytes(data).decode("utf-8", "replace"), problem)

    Tolerant.__name__ = Tolerant.__qualname__ = f"Tolerant{base.__name__}"
    return Tolerant


_TOO_DEEP = "is JSON nested too deeply to read"

# Text-format loaders: fetch_rows reads with a text cursor. Date and time types are the ones whose
# PostgreSQL range (infinity, BC, beyond year 9999) Python cannot hold; a json value nested some
# thousand levels deep is valid to PostgreSQL and beyond Python's recursion limit (without this, one
# such row failed every run's select step).
_TOLERANT_LOADERS: dict[str, type[Loader]] = {
    "date": _tolerant(pg_datetime.DateLoader, OUT_OF_RANGE),
    "timestamp": _tolerant(pg_datetime.TimestampLoader, OUT_OF_RANGE),
    "timestamptz": _tolerant(pg_datetime.TimestamptzLoader, OUT_OF_RANGE),
    "interval": _tolerant(pg_datetime.IntervalLoader, OUT_OF_RANGE),
    "json": _tolerant(pg_json.JsonLoader, _TOO_DEEP),
    "jsonb": _tolerant(pg_json.JsonbLoader, _TOO_DEEP),
}


def check_source(conn: psycopg.Connection[Any], relation: str) -> None:
    """
    Raise :class:`SourceError` unless ``relation`` can carry the payload: it exists, has every contract
    column, each of a type the payload maps (:mod:`cdr_webhook.source_types`), and its newest rows read
    without a PostgreSQL error.

    A run over a view with a wrong type would record every CDR of its interval ``skipped``; one whose
    query fails (a cast that fails on one value) would fail on every row. Both fail here, before the
    run queues anything or moves the watermark: correcting the view lets the next run deliver them.
    """
    types = column_types(conn, relation)
    missing = [column for column in SOURCE_COLUMNS if column not in types]
    if missing:
        raise SourceError(f"source relation {relation!r} lacks the column(s) {', '.join(missing)}")
    fatal = [problem for problem in check_types(types) if problem.fatal]
    if fatal:
        raise SourceError(
            f"source relation {relation!r} cannot carry the payload, so no CDR was queued: "
            + "; ".join(problem.message for problem in fatal)
        )
    failure = probe_newest(conn, relation, RUN_START_PROBE_ROWS)
    if failure is not None:
        raise SourceError(f"{failure.message}; no CDR was queued: correct the view, the next run sends them")


#: The newest source rows every run start reads through the view, so that a failing cast fails the run.
RUN_START_PROBE_ROWS = 100


def column_types(conn: psycopg.Connection[Any], relation: str) -> dict[str, str]:
    """
    Return the relation's columns and their type names, as :mod:`cdr_webhook.source_types` names them.

    A domain is named by its base type (psycopg loads its values as those of the base type), any enum
    type ``enum`` and an array of one ``enum[]`` (psycopg loads enum values as text).
    """
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (relation_name(relation),)).fetchone()
    if not row or not row[0]:
        raise SourceError(
            f"source relation {relation!r} does not exist: create the view cdr_webhook_source over your "
            "CDR tables (see docs/your-database.md) or set AIRFLOW__CDR_WEBHOOK__SOURCE_RELATION"
        )
    rows = conn.execute(
        """
        SELECT a.attname,
               CASE WHEN b.typtype = 'e' THEN 'enum'
                    WHEN e.typtype = 'e' THEN 'enum[]'
                    ELSE format_type(b.oid, NULL) END
        FROM pg_attribute AS a
        JOIN pg_type AS t ON t.oid = a.atttypid
        JOIN pg_type AS b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
        LEFT JOIN pg_type AS e ON e.oid = b.typelem AND b.typcategory = 'A'
        WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (relation_name(relation),),
    ).fetchall()
    return {name: type_name for name, type_name in rows}


@dataclasses.dataclass(frozen=True)
class QueryFailure:
    """Reading the relation fails in PostgreSQL: its error, and the columns whose reading alone fails."""

    relation: str
    error: str
    columns: tuple[str, ...]
    rows: int

    @property
    def message(self) -> str:
        text = f"reading the newest {self.rows} rows of {self.relation!r} fails: PostgreSQL: {self.error}"
        if not self.columns:
            return text + " (every column reads on its own: the view's FROM or WHERE part fails)"
        if len(self.columns) == len(SOURCE_COLUMNS) or self.columns == ("created_at",):
            return text + f" (column {self.columns[0]}, and every query that orders by it)"
        hints = [f"column {column}: e.g. {_safe_cast(column)} AS {column}" for column in self.columns]
        return text + f" ({'; '.join(hints)})"


def _safe_cast(column: str) -> str:
    # A value that fails its cast is text that does not parse: the safe form gives NULL for it.
    return suggest_cast(column, "text")


def _newest(columns: Iterable[str], relation: str) -> sql.Composed:
    return sql.SQL(
        "SELECT {columns} FROM {relation} WHERE created_at IS NOT NULL ORDER BY created_at DESC LIMIT %s"
    ).format(
        columns=sql.SQL(", ").join(sql.Identifier(column) for column in columns),
        relation=relation_identifier(relation),
    )


def probe_newest(conn: psycopg.Connection[Any], relation: str, rows: int) -> QueryFailure | None:
    """
    Read the newest ``rows`` rows through the relation; on a PostgreSQL error, find the columns it is in.

    ``LIMIT 0`` would evaluate no cast: reading real rows does. Each read runs in a transaction of its
    own (a savepoint inside the caller's), so a failure leaves the connection usable. The rows are
    not loaded into Python: only PostgreSQL's evaluation of them is tested here.
    """
    try:
        with conn.transaction():
            conn.execute(_newest(SOURCE_COLUMNS, relation), (rows,))
    except psycopg.OperationalError:
        raise
    except psycopg.DatabaseError as err:
        error = " ".join(str(err).split())
    else:
        return None
    failing = []
    for column in ("created_at", *PAYLOAD_FIELDS):
        try:
            with conn.transaction():
                conn.execute(_newest([column], relation), (rows,))
        except psycopg.OperationalError:
            raise
        except psycopg.DatabaseError:
            failing.append(column)
            if column == "created_at":
                break  # every other read orders by it
    return QueryFailure(relation, error, tuple(failing), rows)


def newest_keys(
    conn: psycopg.Connection[Any], relation: str, limit: int
) -> list[tuple[str | None, dt.datetime | Unloadable]]:
    """The ``(cdr_id, created_at)`` of the newest ``limit`` rows, newest first (a NULL cdr_id as None)."""
    query = _newest(["cdr_id", "created_at"], relation)
    with conn.cursor() as cur:
        for type_name, loader in _TOLERANT_LOADERS.items():
            cur.adapters.register_loader(type_name, loader)
        cur.execute(query, (limit,))
        return [(None if cdr_id is None else str(cdr_id), created) for cdr_id, created in cur.fetchall()]


def window_keys(
    conn: psycopg.Connection[Any],
    relation: str,
    *,
    start: dt.datetime,
    end: dt.datetime,
    client_id: int | None = None,
    limit: int,
) -> list[tuple[str | None, dt.datetime, int | None]]:
    """The ``(cdr_id, created_at, client_id)`` of the rows with ``start <= created_at < end``, oldest
    first."""
    client_filter = sql.SQL(" AND client_id = %(client_id)s" if client_id is not None else "")
    query = sql.SQL(
        "SELECT cdr_id::text, created_at, client_id FROM {relation} "
        "WHERE created_at >= %(start)s AND created_at < %(end)s{client} "
        "ORDER BY created_at, cdr_id::text LIMIT %(limit)s"
    ).format(relation=relation_identifier(relation), client=client_filter)
    params = {"start": start, "end": end, "client_id": client_id, "limit": limit}
    return [tuple(row) for row in conn.execute(query, params).fetchall()]  # type: ignore[misc]


def range_plan(conn: psycopg.Connection[Any], relation: str, *, start: dt.datetime, end: dt.datetime) -> Any:
    """
    Return the JSON plan of a range scan over ``created_at``, with sequential scans discouraged.

    On a small trial table the planner rightly prefers a sequential scan even with the index; with
    ``enable_seqscan`` off it takes any index the range can use, and still a sequential scan when
    there is none: so the plan says whether the index exists and is reachable, whatever the size.
    """
    query = sql.SQL(
        "EXPLAIN (FORMAT JSON, VERBOSE) SELECT {columns} FROM {relation} "
        "WHERE created_at >= %(start)s AND created_at < %(end)s"
    ).format(
        columns=sql.SQL(", ").join(sql.Identifier(column) for column in SOURCE_COLUMNS),
        relation=relation_identifier(relation),
    )
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        row = conn.execute(query, {"start": start, "end": end}).fetchone()
    assert row is not None
    return row[0]


def invalid_indexes(conn: psycopg.Connection[Any], table: str) -> list[str]:
    """The indexes of ``table`` PostgreSQL does not use because they are invalid (an interrupted build)."""
    rows = conn.execute(
        "SELECT i.indexrelid::regclass::text FROM pg_index AS i "
        "WHERE i.indrelid = to_regclass(%s) AND NOT i.indisvalid ORDER BY 1",
        (table,),
    ).fetchall()
    return [row[0] for row in rows]


def view_definition(conn: psycopg.Connection[Any], relation: str) -> str | None:
    """The SELECT of ``relation`` when it is a view or a materialized view (None for a table)."""
    row = conn.execute(
        "SELECT CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END "
        "FROM pg_class AS c WHERE c.oid = to_regclass(%s)",
        (relation,),
    ).fetchone()
    return row[0] if row else None


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
