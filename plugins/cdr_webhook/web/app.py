"""The Deliveries page's app and its pages: the list, a delivery, a task's, completeness, endpoints.

Reads go to the ledger and the source (``cdr_db``); the state changes are in :mod:`.actions`.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlencode

import psycopg
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cdr_webhook.adapters import load_endpoint
from cdr_webhook.endpoint_config import EndpointConfigError
from cdr_webhook.ledger import endpoints, health, owner_alerts, watch_health
from cdr_webhook.web import actions, deliveries, endpoint_pages, forms
from cdr_webhook.web.deps import HERE, Conn, login_url, prefix, render, settings, templates
from cdr_webhook.web.endpoint_pages import owner_of
from cdr_webhook.web.next_request import next_request
from cdr_webhook.web.security import CanView  # noqa: TC001 (FastAPI reads the annotations at runtime)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

PAGE_SIZE = 50
#: The stylesheet and the nav icon: served to signed-in users like every other route.
STATIC_FILES = {"style.css": "text/css", "icon.svg": "image/svg+xml"}
#: On every response (pages, files, errors): only Airflow's own pages may frame the page (its nav
#: shows it in an iframe), and no browser guesses a type other than the one sent.
SECURITY_HEADERS = {
    "content-security-policy": "frame-ancestors 'self'",
    "x-content-type-options": "nosniff",
}


def create_app() -> FastAPI:
    """The page's app, mounted by the plugin at ``/cdr-webhook``."""
    app = FastAPI(title="CDR webhook deliveries", docs_url=None, redoc_url=None, openapi_url=None)
    app.exception_handler(StarletteHTTPException)(_error)
    app.exception_handler(Exception)(_crash)
    app.exception_handler(psycopg.OperationalError)(_database_error)
    app.middleware("http")(_security_headers)
    app.add_api_route("/static/{name}", static_file, methods=["GET"], response_class=FileResponse)
    for path, page in (
        ("/", list_page),
        ("/delivery", delivery_page),
        ("/task", task_page),
        ("/completeness", completeness_page),
        ("/endpoints", endpoints_page),
    ):
        app.add_api_route(path, page, methods=["GET"], response_class=HTMLResponse, response_model=None)
    app.include_router(actions.router)
    app.include_router(endpoint_pages.router)
    return app


async def _security_headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    response = await call_next(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def _error(request: Request, exc: StarletteHTTPException) -> HTMLResponse:
    # A plain page, never one with the user's data: no user may be known here.
    return templates.TemplateResponse(
        request,
        "error.html",
        {
            "status": exc.status_code,
            "detail": exc.detail,
            "login": login_url() if exc.status_code == 401 else None,
        },
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _database_error(request: Request, exc: Exception) -> HTMLResponse:
    if isinstance(exc, psycopg.errors.QueryCanceled):
        limit = settings().page_statement_timeout_seconds
        detail = (
            f"the query ran longer than {limit:g} s (page_statement_timeout_seconds) and was cancelled: "
            "narrow the filters (a client, fewer days)"
        )
    else:
        log.warning("The Deliveries page lost the CDR database: %s", type(exc).__name__)
        detail = "the CDR database (connection 'cdr_db') stopped answering: try again, or check the database"
    return await _error(request, StarletteHTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail))


async def _crash(request: Request, exc: Exception) -> HTMLResponse:
    # Starlette sends this one from outside every middleware: the headers are set here too. The
    # traceback goes to the api-server's log only (it may hold a connection's parse error).
    log.error("The Deliveries page failed on %s", request.url.path, exc_info=exc)
    return templates.TemplateResponse(
        request,
        "error.html",
        {"status": 500, "detail": "the page failed; the api-server's log says why", "login": None},
        status_code=500,
        headers=SECURITY_HEADERS,
    )


def static_file(name: str, user: CanView) -> FileResponse:
    if name not in STATIC_FILES:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {name!r}")
    return FileResponse(HERE / "static" / name, media_type=STATIC_FILES[name])


def list_page(
    request: Request,
    user: CanView,
    conn: Conn,
    query: Annotated[forms.ListQuery, Depends()],
    cursor: Annotated[str | None, Query()] = None,
) -> HTMLResponse:
    """The ledger, newest first, filtered and searched; one keyset page."""
    error = None
    page = deliveries.Page(rows=[], next_cursor=None)
    try:
        filters = query.filters(conn, settings().source_relation)
        page = deliveries.list_deliveries(conn, filters, cursor=cursor, limit=PAGE_SIZE)
    except (ValueError, OverflowError) as err:  # BadCursor is one; a day past 9999-12-31 overflows
        error = str(err)
    return render(
        request, "deliveries.html", user, status_code=400 if error else 200, page=page, query=query,
        error=error, statuses=deliveries.LIST_STATUSES, cursor=cursor, watcher=_watcher(conn),
    )  # fmt: skip


def delivery_page(request: Request, user: CanView, conn: Conn, cdr_id: str, endpoint: str) -> HTMLResponse:
    """One delivery: its row, every attempt, and the request it would send now."""
    row = deliveries.get_delivery(conn, cdr_id=cdr_id, endpoint=endpoint)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no delivery of CDR {cdr_id!r} to {endpoint!r}")
    # A queued CDR of a paused endpoint is held until someone resumes it: the page says so, and why.
    state = endpoints.list_endpoints(conn, endpoint=row.endpoint) if row.status == "queued" else []
    held = state[0] if state and state[0].paused else None
    # The Params of a run that sends this CDR alone (window_end is excluded), if it cannot be cleared.
    created = row.cdr_created_at.astimezone(dt.UTC)
    alone = {
        "window_start": created.isoformat(),
        "window_end": (created + dt.timedelta(microseconds=1)).isoformat(),
        "policy": "all",
    } | ({"client_id": row.client_id} if row.client_id is not None else {})
    return render(
        request, "delivery.html", user, row=row, held=held, alone=alone,
        history=deliveries.attempts(conn, cdr_id=cdr_id, endpoint=endpoint),
        next_request=next_request(
            conn, row, relation=settings().source_relation, max_bytes=settings().max_payload_bytes
        ),
    )  # fmt: skip


def task_page(
    request: Request,
    user: CanView,
    conn: Conn,
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: Annotated[int, Query(ge=-1, le=2**31 - 1)] = -1,  # an integer column: no numeric compare
) -> HTMLResponse | RedirectResponse:
    """The task instance tab: the deliveries that task instance owns (one: straight to it)."""
    rows = deliveries.task_deliveries(conn, dag_id=dag_id, run_id=run_id, map_index=map_index)
    if len(rows) == 1:
        target = urlencode({"cdr_id": rows[0].cdr_id, "endpoint": rows[0].endpoint})
        return RedirectResponse(f"{prefix(request)}/delivery?{target}", status_code=status.HTTP_303_SEE_OTHER)
    return render(request, "task.html", user, rows=rows, task_id=task_id, run_id=run_id, map_index=map_index)


def completeness_page(
    request: Request, user: CanView, conn: Conn, since: str = "", to: str = "", client: str = ""
) -> HTMLResponse:
    """Per client and UTC day (the last 7 by default): the source's CDRs against the ledger."""
    today = dt.datetime.now(dt.UTC).date()
    error, days = None, []
    try:
        start = forms.parse_day(since, "from") or today - dt.timedelta(days=6)
        end = forms.parse_day(to, "to") or today
        days = deliveries.completeness(
            conn,
            relation=settings().source_relation,
            start=start,
            end=end + dt.timedelta(days=1),
            client_id=forms.parse_int(client, "client"),
        )
    except (ValueError, OverflowError) as err:
        error, start, end = str(err), today, today
    return render(
        request, "completeness.html", user, status_code=400 if error else 200, days=days,
        since=start.isoformat(), to=end.isoformat(), client=client, error=error,
    )  # fmt: skip


def endpoints_page(request: Request, user: CanView, conn: Conn) -> HTMLResponse:
    """Every endpoint's state, backlog, in-flight and rate limits, with pause and resume."""
    default_limit, default_rate = settings().max_in_flight_per_endpoint, settings().rate_limit_per_second
    rows = []
    alerts = owner_alerts.latest(conn)
    for state in endpoints.list_endpoints(conn):
        try:
            config = load_endpoint(state.endpoint)
            limit, origin, problem = config.in_flight_limit(default_limit), config.origin, None
            auth = config.auth.describe()  # names and origins, never a value
            rate = config.rate_limit(default_rate)
        except EndpointConfigError as err:
            limit, origin, problem, auth, rate = default_limit, None, str(err), None, default_rate
            if problem in (state.reason or ""):
                problem = None  # the pause's reason says it already (a held endpoint's)
        rows.append({
            "state": state, "limit": limit, "rate": rate, "origin": origin, "problem": problem, "auth": auth,
            **owner_of(state.endpoint), "alert": alerts.get(state.endpoint),
        })  # fmt: skip
    day = health.trends(conn, health.PERIODS["day"], now=dt.datetime.now(dt.UTC))
    return render(
        request, "endpoints.html", user, rows=rows, automatic=endpoints.AUTOMATIC_ACTOR, trends=day,
        watcher=_watcher(conn),
    )  # fmt: skip


def _watcher(conn: psycopg.Connection) -> watch_health.Verdict:
    """The commit watcher's health: a banner when CDRs go out by the minute schedule only."""
    config = settings()
    return watch_health.watcher_verdict(conn, config.source_relation, config.watch_interval_seconds)
