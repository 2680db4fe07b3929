"""Install or remove the NOTIFY trigger (sql/notify_trigger.sql) on the table the dialer inserts into."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg import sql

from cdr_webhook.db import relation_identifier

if TYPE_CHECKING:
    import psycopg

#: The function's SQL, inside the package (the image ships plugins/ only); sql/notify_trigger.sql links it.
SQL_FILE = Path(__file__).with_name("notify_trigger.sql")
TRIGGER_NAME = "cdr_webhook_notify"


class NotifyError(RuntimeError):
    """The trigger cannot go on that relation; the message says why and what to name instead."""


def _kind(conn: psycopg.Connection[Any], table: str) -> str | None:
    row = conn.execute(
        "SELECT c.relkind FROM pg_class AS c WHERE c.oid = to_regclass(%s)", (table,)
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
            (table, TRIGGER_NAME),
        ).fetchone()
        conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {name} ON {table}").format(
                name=sql.Identifier(TRIGGER_NAME), table=relation_identifier(table)
            )
        )
    return bool(row and row[0])
