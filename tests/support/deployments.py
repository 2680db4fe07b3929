"""Helpers for the test modules that start a real Airflow (demo/stack.py) on the tests' PostgreSQL."""

from __future__ import annotations

import base64
import contextlib
import time
from typing import TYPE_CHECKING, Any

import psycopg

from demo.connections import http_conn, postgres_conn
from demo.receiver import Receiver
from demo.stack import AirflowStack

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path

#: The credentials of the tests' receiver (demo/receiver.py), set on its ``cdr_webhook`` connection.
API_KEY = "k3y-7d41c0ffee9b2e"
SIGNING_SECRET = "whsec_" + base64.b64encode(b"cdr-webhook-test-signing-key-32b").decode()


def wait_for_watcher(stack: AirflowStack, timeout: float = 90) -> None:
    """Wait for the commit watcher: the triggerer starts it once the dag-processor registered the asset."""
    deadline = time.monotonic() + timeout
    while "Watching cdr_webhook_source" not in stack.log_tail("triggerer", 1_000_000):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the triggerer started no commit watcher within {timeout:g} s")
        time.sleep(0.25)


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


@contextlib.contextmanager
def receiver_deployment(
    home: Path,
    pg_server: str,
    cdr_dsn: str,
    env: Mapping[str, str],
    *servers: Any,
    stack_class: type[AirflowStack] = AirflowStack,
    **stack_options: Any,
) -> Iterator[tuple[AirflowStack, Receiver]]:
    """
    A real Airflow on a clean CDR database, delivering to a verifying receiver; yield both.

    The CDR database is connection ``cdr_db`` and the receiver the default endpoint, ``cdr_webhook``;
    ``env`` adds the module's settings and connections. At the end the stack, the receiver and the
    ``servers`` are stopped (see :func:`deployed`).
    """
    prepare_cdr_database(cdr_dsn)
    receiver = Receiver(secret=SIGNING_SECRET, api_key=API_KEY).start()
    connections = {
        "AIRFLOW_CONN_CDR_DB": postgres_conn(cdr_dsn),
        "AIRFLOW_CONN_CDR_WEBHOOK": http_conn(receiver.url, api_key=API_KEY, signing_secret=SIGNING_SECRET),
    }
    stack = stack_class(home, pg_server, {**connections, **env}, **stack_options)
    with deployed(stack, receiver, *servers):
        yield stack, receiver
