"""The CDR database: its Airflow connection opened with psycopg 3, and helpers every query module uses."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import pq, sql

from cdr_webhook.setting_values import relation_parts
from cdr_webhook.settings import CDR_DB_CONN_ID

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterator, Mapping

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
    psycopg2 it loads) would cost every ``post_cdr`` try their import. A connection with an extra only
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
    ``async_extra``; the sync property would block its event loop on secret masking).
    """
    return {
        "host": connection.host,
        "user": connection.login,
        "password": connection.password,
        "dbname": connection.schema,
        "port": connection.port,
        **(connection.extra_dejson if extra is None else extra),
    }


def database_now(conn: psycopg.Connection[Any]) -> dt.datetime:
    """The CDR database's clock: the one ``created_at`` (by its default) and the commit watcher use."""
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]


def connection_secrets(args: Mapping[str, Any]) -> tuple[str, ...]:
    """
    The secrets among ``psycopg.connect`` arguments: the values of the parameters libpq itself hides
    (``password``, ``sslpassword``, and any other it marks as a password field), to scrub from errors.
    """
    hidden = {option.keyword.decode() for option in pq.Conninfo.get_defaults() if option.dispchar == b"*"}
    return tuple(str(value) for key, value in args.items() if key in hidden and value)


async def async_extra(connection: Any) -> dict[str, Any]:
    """
    The extras of ``connection`` parsed and their values masked in logs, without blocking an event loop.

    What ``Connection.aextra_dejson()`` does; that method exists only from Airflow 3.3.2 (Task SDK
    1.3.2), and the watcher runs on 3.3.0 too. Unlike it, extras that are not a JSON object raise
    instead of reading as none: the watcher would otherwise connect with the wrong parameters.
    """
    from airflow.sdk.log import amask_secret

    if not connection.extra:
        return {}
    try:
        extra = json.loads(connection.extra)
    except ValueError:
        extra = None
    if not isinstance(extra, dict):
        raise ValueError(f"connection {connection.conn_id!r}: its extra is not a JSON object")
    await amask_secret(extra)
    return extra


def _through_provider(conn_id: str) -> psycopg.Connection[Any]:
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    conn = PostgresHook(postgres_conn_id=conn_id).get_conn()
    if not isinstance(conn, psycopg.Connection):
        raise RuntimeError(
            "the Postgres provider returned a psycopg2 connection; cdr_webhook needs psycopg 3 "
            "(install psycopg[binary] beside SQLAlchemy 2, as requirements.txt pins)"
        )
    return conn


@contextlib.contextmanager
def without_jit(conn: psycopg.Connection[Any], *, parallel: bool = True) -> Iterator[None]:
    """
    Run the block's statements without JIT compilation (in a transaction: the setting is local to it).

    PostgreSQL compiles a statement whose estimated cost passes ``jit_above_cost``. Reading a day of
    CDRs by index is estimated that high, yet compiling it takes longer than running it. With
    ``parallel=False``, also without parallel workers (``max_parallel_workers_per_gather`` 0): a
    reconciliation slice is slower with them (their start-up), and for bigger slices the planner's
    parallel plan joins the source view by a scan of its biggest table. The settings are back as
    they were when the block ends (on an error, when the transaction or savepoint it aborted is
    rolled back).
    """
    if conn.info.transaction_status != pq.TransactionStatus.INTRANS:
        with conn.transaction(), without_jit(conn, parallel=parallel):
            yield
        return
    names = ["jit"] if parallel else ["jit", "max_parallel_workers_per_gather"]
    values = {"jit": "off", "max_parallel_workers_per_gather": "0"}
    was = [_set_local(conn, name, values[name]) for name in names]
    yield
    for name, value in zip(names, was, strict=True):
        _set_local(conn, name, value)


def _set_local(conn: psycopg.Connection[Any], name: str, value: str) -> str:
    """Set a setting for the rest of the transaction; return what it was."""
    row = conn.execute("SELECT current_setting(%s), set_config(%s, %s, true)", (name, name, value)).fetchone()
    assert row is not None
    return str(row[0])


def relation_identifier(relation: str) -> sql.Identifier:
    """
    Return the SQL identifier of a (possibly schema-qualified) relation name, for a query's FROM.

    The name is read as PostgreSQL reads it (:func:`~cdr_webhook.setting_values.relation_parts`), as
    :func:`relation_name` hands it to ``to_regclass``: a check and the queries it vouches for read
    the same relation.
    """
    return sql.Identifier(*relation_parts(relation))


def relation_name(relation: str) -> str:
    """The relation name with every part quoted, for ``to_regclass(%s)``: the relation the queries read."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in relation_parts(relation))
