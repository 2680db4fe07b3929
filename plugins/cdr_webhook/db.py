"""Connections to the CDR database through Airflow's Postgres provider (psycopg 3)."""

from __future__ import annotations

from typing import Any

import psycopg

from cdr_webhook.settings import CDR_DB_CONN_ID


def connect(conn_id: str = CDR_DB_CONN_ID) -> psycopg.Connection[Any]:
    """
    Open the CDR database of Airflow connection ``conn_id``, in autocommit mode.

    Autocommit because every unit of work states its own ``conn.transaction()``: a claim and the
    watermark move commit together, and an attempt's record commits before the task ends.
    """
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    conn = PostgresHook(postgres_conn_id=conn_id).get_conn()
    if not isinstance(conn, psycopg.Connection):
        raise RuntimeError(
            "the Postgres provider returned a psycopg2 connection; cdr_webhook needs psycopg 3 "
            "(install psycopg[binary] beside SQLAlchemy 2, as requirements.txt pins)"
        )
    conn.autocommit = True
    return conn
