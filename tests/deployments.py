"""Helpers for the test modules that start a real Airflow (demo/stack.py) on the tests' PostgreSQL."""

from __future__ import annotations

import psycopg


def prepare_cdr_database(dsn: str) -> None:
    """A clean CDR database for a deployment: the reference schema, the ledger and endpoint tables."""
    from cdr_webhook.schema import migrate
    from demo.dialer import load_reference_schema

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS cdr_webhook, dialer CASCADE")
        conn.execute("DROP VIEW IF EXISTS public.cdr_webhook_source")
        load_reference_schema(conn)
        migrate(conn)
