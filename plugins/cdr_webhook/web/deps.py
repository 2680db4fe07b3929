"""What every route of the page needs: the CDR database, the settings, Airflow's address, rendering."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import psycopg
from airflow.configuration import conf
from airflow.exceptions import AirflowNotFoundException
from airflow.sdk import BaseHook
from fastapi import Depends, HTTPException, Request, status
from fastapi.templating import Jinja2Templates
from psycopg_pool import ConnectionPool, PoolTimeout

from cdr_webhook.adapters import load_settings
from cdr_webhook.db import PROVIDER_EXTRAS, connect, connection_args
from cdr_webhook.ledger.schema import migrate
from cdr_webhook.redact import scrub
from cdr_webhook.settings import CDR_DB_CONN_ID, DAG_ID
from cdr_webhook.web import airflow_api
from cdr_webhook.web.security import csrf_token, permissions

if TYPE_CHECKING:
    from collections.abc import Iterator

    from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
    from fastapi.responses import HTMLResponse

    from cdr_webhook.settings import Settings

log = logging.getLogger(__name__)

HERE = Path(__file__).parent

templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["when"] = lambda value: value.strftime("%Y-%m-%d %H:%M:%S") if value else "–"
templates.env.globals["ui_task"] = airflow_api.ui_task_path
templates.env.globals["ui_run"] = airflow_api.ui_run_path
templates.env.globals["nope"] = f"your Airflow role may not do this on the {DAG_ID} DAG"


#: Connections the page keeps open to the CDR database per api-server worker, and how long a request
#: waits for one of them when all are busy.
POOL_MAX_SIZE = 4
POOL_WAIT_SECONDS = 5.0
#: The page's own name for the CDR database, in every message that asks for it to be fixed.
NO_DATABASE_HINT = (
    "define the Airflow connection {conn_id!r} (Postgres: the CDR database with the cdr_webhook ledger) "
    "where the api-server can read it (Admin → Connections, a secrets backend, or AIRFLOW_CONN_{env}), "
    "and make sure the database is running and reachable from the api-server"
)


class _Pools:
    """One connection pool per process, for the connection's current arguments (re-made when they change)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: str | None = None
        self._pool: Any = None
        self.migrated = False

    def get(self, args: dict[str, Any], timeout_ms: int) -> Any:
        key = repr(sorted(args.items())) + f"/{timeout_ms}"
        with self._lock:
            if self._key != key:
                # A database that cannot be reached is said at once, not after the pool's wait.
                problem = _probe(args)
                if problem:
                    raise _unreachable(args, problem)
                if self._pool is not None:
                    self._pool.close()
                # Set once per connection: every query of the page runs under the timeout.
                options = f"{args.get('options', '')} -c statement_timeout={timeout_ms}".strip()
                self._pool = ConnectionPool(
                    kwargs={**args, "options": options, "autocommit": True},
                    min_size=0,
                    max_size=POOL_MAX_SIZE,
                    timeout=POOL_WAIT_SECONDS,
                    check=ConnectionPool.check_connection,  # a database restarted since is reconnected
                    open=True,
                    name="cdr-webhook-page",
                )
                self._key, self.migrated = key, False
            return self._pool


_pools = _Pools()


def _unavailable(detail: str) -> HTTPException:
    env = CDR_DB_CONN_ID.upper()
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        f"{detail}. To fix it: {NO_DATABASE_HINT.format(conn_id=CDR_DB_CONN_ID, env=env)}.",
    )


def _connection() -> Any:
    """The ``cdr_db`` Airflow connection; a 503 naming it when it is not defined."""
    try:
        return BaseHook.get_connection(CDR_DB_CONN_ID)
    except AirflowNotFoundException:
        raise _unavailable(
            f"The Deliveries page reads the CDR database through the Airflow connection "
            f"{CDR_DB_CONN_ID!r}, and the api-server has no such connection"
        ) from None


@contextlib.contextmanager
def _checked_out(connection: Any, timeout_ms: int) -> Iterator[psycopg.Connection[Any]]:
    """A connection of the pool (or, for a connection only the provider's hook opens, a new one)."""
    if PROVIDER_EXTRAS & connection.extra_dejson.keys():
        # Cloud IAM tokens and the like expire: the provider's hook makes each connection afresh.
        with connect() as conn:
            conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(timeout_ms),))
            yield conn
        return
    args = connection_args(connection)
    pool = _pools.get(args, timeout_ms)
    try:
        conn = pool.getconn()
    except PoolTimeout:
        raise _unreachable(args) from None
    try:
        yield conn
    finally:
        pool.putconn(conn)  # rolled back first if a transaction was left open


def _probe(args: dict[str, Any]) -> str | None:
    """Why one direct connection to the database fails (None: it works), without its password."""
    try:
        psycopg.connect(**{"connect_timeout": 5, **args}).close()
    except psycopg.Error as err:
        secrets = [args["password"]] if args.get("password") else []
        return scrub(" ".join(str(err).split()), secrets) or type(err).__name__
    return None


def _unreachable(args: dict[str, Any], problem: str | None = None) -> HTTPException:
    where = f"{args.get('host') or 'localhost'}:{args.get('port') or 5432}/{args.get('dbname') or ''}"
    if problem is None:
        problem = _probe(args) or (
            f"all {POOL_MAX_SIZE} of the page's connections stayed busy for {POOL_WAIT_SECONDS:g} s"
        )
    return _unavailable(
        f"The CDR database of the Airflow connection {CDR_DB_CONN_ID!r} ({where}) "
        f"cannot be reached: {problem}"
    )


def _db() -> Iterator[psycopg.Connection[Any]]:
    """
    A pooled connection to the CDR database for one request, under the page's ``statement_timeout``
    (the ledger migrated once per pool: the page may open before the DAG's first run made it).

    A missing ``cdr_db`` connection or an unreachable database is a 503 page saying what to do; a
    query cancelled by the timeout is one too (see :func:`cdr_webhook.web.app.create_app`).
    """
    timeout_ms = round(settings().page_statement_timeout_seconds * 1000)
    with _checked_out(_connection(), timeout_ms) as conn:
        if not _pools.migrated:
            migrate(conn)
            _pools.migrated = True
        yield conn


#: The request's connection to the CDR database (module-level: route annotations are strings).
Conn = Annotated[Any, Depends(_db)]


def settings() -> Settings:
    return load_settings()


def prefix(request: Request) -> str:
    """Where the page is mounted (``/cdr-webhook``): its links start there."""
    return request.scope.get("root_path", "")


def render(
    request: Request, name: str, user: BaseUser, status_code: int = 200, **context: Any
) -> HTMLResponse:
    """A page for ``user``: the CSRF token its forms carry, and which of its actions are enabled."""
    context |= {
        "user": user.get_name(),
        "csrf": csrf_token(user),
        "prefix": prefix(request),
        "may": permissions(user),
    }
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def login_url() -> str | None:
    from airflow.api_fastapi.app import get_auth_manager

    try:
        return get_auth_manager().get_url_login()
    except Exception:  # the page still says 401 when the auth manager cannot name its login page
        log.exception("No login URL from the auth manager")
        return None


def api_base_url() -> str:
    """
    Airflow's REST API address for the page's own calls: ``[api] base_url`` when set, else the
    api-server's bind (``[api] host`` and ``port``; a wildcard bind is reached on loopback).

    Never the request's ``Host`` or origin: those are the client's to write, and a forged one would
    make the api-server POST, with the caller's token, to an address of the client's choosing.
    """
    base = (conf.get("api", "base_url", fallback="") or "").strip()
    if base.startswith(("http://", "https://")):
        return base.rstrip("/")
    host = (conf.get("api", "host", fallback="") or "").strip() or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104 (a bind, not a listen)
    if ":" in host:
        host = f"[{host}]"
    port = conf.getint("api", "port", fallback=8080)
    scheme = "https" if conf.get("api", "ssl_cert", fallback="") else "http"
    return f"{scheme}://{host}:{port}"
