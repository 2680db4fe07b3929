"""Helpers for the tests of the ledger's schema: what a database holds, and one at an older version."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdr_webhook.ledger import schema

if TYPE_CHECKING:
    import psycopg


def columns(conn: psycopg.Connection[Any], table: str) -> set[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'cdr_webhook' "
        "AND table_name = %s",
        (table,),
    ).fetchall()
    return {row[0] for row in rows}


def indexes(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'cdr_webhook'").fetchall()
    return {row[0] for row in rows}


def versions(conn: psycopg.Connection[Any]) -> list[int]:
    return [row[0] for row in conn.execute("SELECT version FROM cdr_webhook.schema_version ORDER BY 1")]


def install_up_to(conn: psycopg.Connection[Any], version: int) -> None:
    """A database as the migrations left it at ``version``: the steps up to it, each recorded."""
    conn.execute(schema._VERSION_TABLE)
    for step in schema.STEPS[:version]:
        conn.execute(step.ddl)
        conn.execute(
            "INSERT INTO cdr_webhook.schema_version (version, name) VALUES (%s, %s)",
            (step.version, step.name),
        )
