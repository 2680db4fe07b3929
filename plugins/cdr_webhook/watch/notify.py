"""Install or remove the NOTIFY trigger (sql/notify_trigger.sql) on the table the dialer inserts into,
and find whether the tables behind a source relation have it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg import sql

from cdr_webhook.db import relation_identifier, relation_name
from cdr_webhook.selection.source_check import Finding

if TYPE_CHECKING:
    import psycopg

#: The function's SQL, inside the package (the image ships plugins/ only); sql/notify_trigger.sql links it.
SQL_FILE = Path(__file__).with_name("notify_trigger.sql")
TRIGGER_NAME = "cdr_webhook_notify"


class NotifyError(RuntimeError):
    """The trigger cannot go on that relation; the message says why and what to name instead."""


def _kind(conn: psycopg.Connection[Any], table: str) -> str | None:
    row = conn.execute(
        "SELECT c.relkind FROM pg_class AS c WHERE c.oid = to_regclass(%s)", (relation_name(table),)
    ).fetchone()
    return row[0] if row else None


def install(conn: psycopg.Connection[Any], table: str) -> None:
    """Create the function and the statement-level AFTER INSERT trigger on ``table`` (idempotent)."""
    kind = _kind(conn, table)
    if kind is None:
        raise NotifyError(f"table {table!r} does not exist")
    if kind in ("v", "m"):
        raise NotifyError(
            f"{table!r} is a view: install the trigger on the table your dialer inserts CDRs into "
            "(the one behind the view's created_at, e.g. dialer.cdr)"
        )
    if kind not in ("r", "p"):
        raise NotifyError(f"{table!r} is not a table")
    with conn.transaction():
        conn.execute(SQL_FILE.read_text())
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {name} AFTER INSERT ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION cdr_webhook.notify_commit()"
            ).format(name=sql.Identifier(TRIGGER_NAME), table=relation_identifier(table))
        )


def remove(conn: psycopg.Connection[Any], table: str) -> bool:
    """Drop the trigger from ``table``; return whether it was there. The function stays (it is harmless)."""
    if _kind(conn, table) is None:
        raise NotifyError(f"table {table!r} does not exist")
    with conn.transaction():
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = %s)",
            (relation_name(table), TRIGGER_NAME),
        ).fetchone()
        conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {name} ON {table}").format(
                name=sql.Identifier(TRIGGER_NAME), table=relation_identifier(table)
            )
        )
    return bool(row and row[0])


#: The tables a relation reads, through views over views (the rewrite rules' dependencies), each with
#: whether it has the trigger; a table reads itself.
_TABLES_BEHIND = """
WITH RECURSIVE behind(oid) AS (
    SELECT to_regclass(%(relation)s)::oid
    UNION
    SELECT d.refobjid
    FROM behind
    JOIN pg_rewrite AS r ON r.ev_class = behind.oid
    JOIN pg_depend AS d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
        AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> behind.oid
)
SELECT c.oid::regclass::text,
       EXISTS (SELECT 1 FROM pg_trigger AS t WHERE t.tgrelid = c.oid AND t.tgname = %(name)s)
FROM behind JOIN pg_class AS c ON c.oid = behind.oid
WHERE c.relkind IN ('r', 'p')
ORDER BY 1
"""


def tables_behind(conn: psycopg.Connection[Any], relation: str) -> dict[str, bool]:
    """The tables ``relation`` reads (itself if it is one), each with whether it has the trigger."""
    rows = conn.execute(_TABLES_BEHIND, {"relation": relation_name(relation), "name": TRIGGER_NAME})
    return {table: bool(has) for table, has in rows.fetchall()}


def source_finding(conn: psycopg.Connection[Any], relation: str) -> Finding:
    """``source check``'s notify check: whether a table behind ``relation`` wakes the commit watcher at
    each commit; a warning, naming the command, when none does (the watcher polls).
    """
    tables = tables_behind(conn, relation)
    woken = [table for table, has in tables.items() if has]
    if woken:
        lines = (f"the NOTIFY trigger on {', '.join(woken)} wakes the commit watcher",)
        return Finding("notify", True, lines)
    candidates = ", ".join(tables) or relation
    return Finding(
        "notify",
        True,
        (
            "no NOTIFY trigger: the commit watcher finds new CDRs by polling (twice every "
            "watch_interval_seconds), up to half an interval later than a trigger would wake it",
            "install it on the table your dialer inserts CDRs into, one of those the relation reads "
            f"({candidates}): python -m cdr_webhook source install-notify TABLE",
        ),
        warn=True,
    )
