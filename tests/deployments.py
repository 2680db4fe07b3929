"""Helpers for the test modules that start a real Airflow (demo/stack.py) on the tests' PostgreSQL."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import psycopg

if TYPE_CHECKING:
    from collections.abc import Iterator

    from demo.stack import AirflowStack


def prepare_cdr_database(dsn: str) -> None:
    """A clean CDR database for a deployment: the reference schema, the ledger and endpoint tables."""
    from cdr_webhook.ledger.schema import migrate
    from demo.dialer import load_reference_schema

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS cdr_webhook, dialer CASCADE")
        conn.execute("DROP VIEW IF EXISTS public.cdr_webhook_source")
        load_reference_schema(conn)
        migrate(conn)


@contextlib.contextmanager
def deployed(stack: AirflowStack, *servers: Any) -> Iterator[AirflowStack]:
    """
    Start the stack and unpause the DAG; at the end stop it, drop its metadata database and stop the
    ``servers`` (receivers and the like), then fail if any Airflow process outlived the stop.
    """
    started = time.monotonic()
    stack.start()
    print(f"Airflow up in {time.monotonic() - started:.1f} s")
    try:
        stack.unpause()
        yield stack
    finally:
        leftovers = stack.stop()
        stack.drop_metadata()
        for server in servers:
            server.stop()
        assert not leftovers, leftovers
