"""Connections to the CDR database: an Airflow Postgres connection, opened with psycopg 3."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg

from cdr_webhook.settings import CDR_DB_CONN_ID

if TYPE_CHECKING:
    from collections.abc import Mapping

#: Extras the Postgres provider's hook interprets itself (cloud IAM tokens, Redshift, cursor classes,
#: SQLAlchemy options): a connection with any of them is opened by that hook.
PROVIDER_EXTRAS = frozenset(
    {
        "iam",
        "redshift",
        "redshift-serverless",
        "cursor",
        "cluster-identifier",
        "workgroup-name",
        "aws_conn_id",
        "sqlalchemy_scheme",
        "sqlalchemy_query",
        "azure_conn_id",
    }
)


def connect(conn_id: str = CDR_DB_CONN_ID) -> psycopg.Connection[Any]:
    """
    Open the CDR database of Airflow connection ``conn_id``, in autocommit mode.

    Autocommit because every unit of work states its own ``conn.transaction()``: a claim and the
    watermark move commit together, and an attempt's record commits before the task ends.

    A plain connection (host, port, login, password, schema, libpq parameters as extras) is opened
    as the provider's ``PostgresHook`` opens it, without importing that hook: its module (and the
    psycopg2 it loads) cost every ``post_cdr`` try ~40-60 ms of CPU. A connection with an extra only
    the hook understands (:data:`PROVIDER_EXTRAS`) is opened by the hook.
    """
    from airflow.sdk import BaseHook

    connection = BaseHook.get_connection(conn_id)
    extra = connection.extra_dejson
    if PROVIDER_EXTRAS & extra.keys():
        conn = _through_provider(conn_id)
    else:
        conn = psycopg.connect(**connection_args(connection))
    conn.autocommit = True
    return conn


def connection_args(connection: Any, *, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """
    The ``psycopg.connect`` arguments of a plain Postgres connection: what ``PostgresHook`` passes.

    ``extra``: the connection's extras when already read (the triggerer reads them with the async
    ``aextra_dejson``; the sync property would block its event loop on secret masking).
    """
    return {
        "host": connection.host,
        "user": connection.login,
        "password": connection.password,
        "dbname": connection.schema,
        "port": connection.port,
        **(connection.extra_dejson if extra is None else extra),
    }


def _through_provider(conn_id: str) -> psycopg.Connection[Any]:
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    conn = PostgresHook(postgres_conn_id=conn_id).get_conn()
    if not isinstance(conn, psycopg.Connection):
        raise RuntimeError(
            "the Postgres provider returned a psycopg2 connection; cdr_webhook needs psycopg 3 "
            "(install psycopg[binary] beside SQLAlchemy 2, as requirements.txt pins)"
        )
    return conn
