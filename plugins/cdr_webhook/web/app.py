"""The Deliveries page's routes: list, detail, a task instance's deliveries, completeness, endpoints.

Reads go to the ledger and the source (``cdr_db``); the only writes are endpoint pause and resume
(our own tables). Redeliveries and completeness runs go to Airflow's REST API as the caller.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from cdr_webhook import deliveries, endpoints
from cdr_webhook.web import airflow_api
from cdr_webhook.web.security import (
    CanClear,
    CanPause,
    CanTrigger,
    CanView,
    caller_token,
    check_csrf,
    csrf_token,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    import psycopg
    from airflow.api_fastapi.auth.managers.models.base_user import BaseUser

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
PAGE_SIZE = 50
#: Deliveries one redelivery may clear (a bigger one is a Params run over the filter).
MAX_REDELIVER = 500
_PHONE_MATCHES = 1000

templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["when"] = lambda value: value.strftime("%Y-%m-%d %H:%M:%S") if value else "–"
templates.env.globals["ui_task"] = airflow_api.ui_task_path
templates.env.globals["ui_run"] = airflow_api.ui_run_path


@functools.cache
def _migrated() -> bool:
    # The page may open before the DAG's first run has made (or upgraded) the ledger.
    from cdr_webhook.schema import migrate

    with _connect() as conn:
        migrate(conn)
    return True


def _connect() -> psycopg.Connection[Any]:
    from cdr_webhook.db import connect

    return connect()


def _db() -> Iterator[psycopg.Connection[Any]]:
    """A connection to the CDR database for one request (the ledger migrated once per process)."""
    _migrated()
    with _connect() as conn:
        yield conn


#: The request's connection to the CDR database (module-level: route annotations are strings).
Conn = Annotated[Any, Depends(_db)]


def _settings() -> Any:
    from cdr_webhook.settings import load_settings

    return load_settings()


def _render(
    request: Request, name: str, user: BaseUser, status_code: int = 200, **context: Any
) -> HTMLResponse:
    context |= {
        "user": user.get_name(),
        "csrf": csrf_token(user),
        "prefix": request.scope.get("root_path", ""),
    }
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def _day(value: str | None, name: str) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a date (YYYY-MM-DD)") from None


def _int(value: str | None, name: str) -> int | None:
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a whole number") from None


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), dt.UTC)


@dataclasses.dataclass
class ListQuery:
    """The list's filters as the form sends them (dates are UTC days, ``to`` inclusive)."""

    client: str = ""
    endpoint: str = ""
    status: str = ""
    since: str = ""
    to: str = ""
    q: str = ""

    def window(self) -> tuple[dt.datetime | None, dt.datetime | None]:
        start, end = _day(self.since, "from"), _day(self.to, "to")
        return (
            _midnight(start) if start else None,
            _midnight(end + dt.timedelta(days=1)) if end else None,
        )

    def filters(self, conn: psycopg.Connection[Any]) -> deliveries.Filters:
        from cdr_webhook.source import cdr_ids_by_phone

        start, end = self.window()
        cdr_ids = None
        if self.q.strip():
            # One box for both: the cdr_id itself (the ledger's key) and the source's CDRs to that
            # number (the index behind the view's phone_number), each an index lookup.
            term = self.q.strip()
            by_phone = cdr_ids_by_phone(
                conn, _settings().source_relation, term, start=start, end=end, limit=_PHONE_MATCHES
            )
            cdr_ids = (term, *by_phone)
        return deliveries.Filters(
            client_id=_int(self.client, "client"),
            endpoint=self.endpoint.strip() or None,
            status=self.status or None,
            start=start,
            end=end,
            cdr_ids=cdr_ids,
        )

    def params(self, **changes: str) -> str:
        values = {k: v for k, v in (dataclasses.asdict(self) | changes).items() if v}
        return urlencode(values)


def create_app() -> FastAPI:
    """The page's app, mounted by the plugin at ``/cdr-webhook``."""
    app = FastAPI(title="CDR webhook deliveries", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(StarletteHTTPException)
    async def _error(request: Request, exc: StarletteHTTPException) -> HTMLResponse:
        # A plain page, never a template with the user's data: no user may be known here.
        return templates.TemplateResponse(
            request,
            "error.html",
            {
                "status": exc.status_code,
                "detail": exc.detail,
                "login": _login_url() if exc.status_code == 401 else None,
            },
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.get("/", response_class=HTMLResponse)
    def list_page(
        request: Request,
        user: CanView,
        conn: Conn,
        query: Annotated[ListQuery, Depends()],
        cursor: Annotated[str | None, Query()] = None,
    ) -> HTMLResponse:
        error = None
        page = deliveries.Page(rows=[], next_cursor=None)
        try:
            page = deliveries.list_deliveries(conn, query.filters(conn), cursor=cursor, limit=PAGE_SIZE)
        except (ValueError, deliveries.BadCursor) as err:
            error = str(err)
        return _render(
            request,
            "deliveries.html",
            user,
            status_code=400 if error else 200,
            page=page,
            query=query,
            error=error,
            statuses=deliveries.LIST_STATUSES,
            cursor=cursor,
        )

    @app.get("/delivery", response_class=HTMLResponse)
    def delivery_page(
        request: Request, user: CanView, conn: Conn, cdr_id: str, endpoint: str
    ) -> HTMLResponse:
        from cdr_webhook.web.preview import preview

        row = deliveries.get_delivery(conn, cdr_id=cdr_id, endpoint=endpoint)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no delivery of CDR {cdr_id!r} to {endpoint!r}")
        history = deliveries.attempts(conn, cdr_id=cdr_id, endpoint=endpoint)
        return _render(
            request,
            "delivery.html",
            user,
            row=row,
            history=history,
            preview=preview(conn, row, relation=_settings().source_relation),
        )

    @app.get("/task", response_class=HTMLResponse)
    def task_page(
        request: Request,
        user: CanView,
        conn: Conn,
        dag_id: str,
        run_id: str,
        task_id: str,
        map_index: int = -1,
    ) -> HTMLResponse:
        rows = deliveries.task_deliveries(conn, dag_id=dag_id, run_id=run_id, map_index=map_index)
        if len(rows) == 1:
            # One CDR per task (the usual case): its delivery's page.
            target = urlencode({"cdr_id": rows[0].cdr_id, "endpoint": rows[0].endpoint})
            prefix = request.scope.get("root_path", "")
            return RedirectResponse(f"{prefix}/delivery?{target}", status_code=status.HTTP_303_SEE_OTHER)
        return _render(
            request, "task.html", user, rows=rows, task_id=task_id, run_id=run_id, map_index=map_index
        )

    @app.post("/redeliver", response_class=HTMLResponse)
    def redeliver(
        request: Request,
        user: CanClear,
        conn: Conn,
        key: Annotated[list[str], Form()],
        csrf: Annotated[str | None, Form()] = None,
    ) -> HTMLResponse:
        check_csrf(request, user, csrf)
        if len(key) > MAX_REDELIVER:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                f"{len(key)} deliveries selected: at most {MAX_REDELIVER} at once; redeliver a bigger set "
                "with a Params run (policy all or failed) over its window",
            )
        keys = []
        for value in key:
            try:
                cdr_id, endpoint_name = json.loads(value)
            except (ValueError, TypeError):
                raise HTTPException(
                    status.HTTP_400_BAD_REQUEST, f"not a delivery key: {value[:80]!r}"
                ) from None
            keys.append((str(cdr_id), str(endpoint_name)))
        rows = deliveries.get_deliveries(conn, keys)
        by_run: dict[str, list[int]] = {}
        not_cleared = []
        for row in rows:
            if (
                row.run_id
                and row.map_index is not None
                and row.map_index >= 0
                and row.dag_id == airflow_api.DAG_ID
            ):
                by_run.setdefault(row.run_id, []).append(row.map_index)
            else:
                not_cleared.append((row, "no task owns it (it waits queued for a run): nothing to clear"))
        api = airflow_api.AirflowApi(_base_url(request), caller_token(request))
        cleared, failures = [], []
        for run_id, indexes in sorted(by_run.items()):
            try:
                cleared.append(api.clear_tasks(run_id, indexes))
            except airflow_api.AirflowApiError as err:
                failures.append((run_id, str(err)))
        log.info(
            "User %s cleared %d task(s) to redeliver",
            user.get_name(),
            sum(len(c.map_indexes) for c in cleared),
        )
        return _render(
            request,
            "result.html",
            user,
            status_code=502 if failures and not cleared else 200,
            action="Redelivery",
            cleared=cleared,
            failures=failures,
            not_cleared=not_cleared,
            runs=[],
            back=keys[0] if len(keys) == 1 else None,
        )

    @app.post("/runs", response_class=HTMLResponse)
    def trigger_run(
        request: Request,
        user: CanTrigger,
        policy: Annotated[str, Form()],
        since: Annotated[str, Form()],
        to: Annotated[str, Form()],
        client: Annotated[str, Form()] = "",
        csrf: Annotated[str | None, Form()] = None,
    ) -> HTMLResponse:
        check_csrf(request, user, csrf)
        try:
            start, end = ListQuery(since=since, to=to).window()
            client_id = _int(client, "client")
        except ValueError as err:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None
        if start is None or end is None or policy not in ("missing", "failed", "all"):
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST, "a run needs from, to and a policy: missing, failed or all"
            )
        conf: dict[str, Any] = {
            "window_start": start.isoformat(),
            "window_end": end.isoformat(),
            "policy": policy,
        }
        if client_id is not None:
            conf["client_id"] = client_id
        api = airflow_api.AirflowApi(_base_url(request), caller_token(request))
        try:
            run_id = api.trigger(conf)
        except airflow_api.AirflowApiError as err:
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(err)) from None
        log.info("User %s triggered run %s with %s", user.get_name(), run_id, conf)
        return _render(
            request, "result.html", user, action="Run", cleared=[], failures=[], not_cleared=[],
            runs=[(run_id, conf)], back=None,
        )  # fmt: skip

    @app.get("/completeness", response_class=HTMLResponse)
    def completeness_page(
        request: Request,
        user: CanView,
        conn: Conn,
        since: str = "",
        to: str = "",
        client: str = "",
    ) -> HTMLResponse:
        today = dt.datetime.now(dt.UTC).date()
        error, days = None, []
        try:
            start = _day(since, "from") or today - dt.timedelta(days=6)
            end = _day(to, "to") or today
            client_id = _int(client, "client")
            days = deliveries.completeness(
                conn,
                relation=_settings().source_relation,
                start=start,
                end=end + dt.timedelta(days=1),
                client_id=client_id,
            )
        except ValueError as err:
            error, start, end = str(err), today, today
        return _render(
            request,
            "completeness.html",
            user,
            status_code=400 if error else 200,
            days=days,
            since=start.isoformat(),
            to=end.isoformat(),
            client=client,
            error=error,
        )

    @app.get("/endpoints", response_class=HTMLResponse)
    def endpoints_page(request: Request, user: CanView, conn: Conn) -> HTMLResponse:
        from cdr_webhook.config import EndpointConfigError, load_endpoint

        default_limit = _settings().max_in_flight_per_endpoint
        rows = []
        for state in endpoints.list_endpoints(conn):
            try:
                config = load_endpoint(state.endpoint)
                limit, origin, problem = config.max_in_flight or default_limit, config.origin, None
            except EndpointConfigError as err:
                limit, origin, problem = default_limit, None, str(err)
            rows.append({"state": state, "limit": limit, "origin": origin, "problem": problem})
        return _render(request, "endpoints.html", user, rows=rows)

    @app.post("/endpoints/{action}", response_class=HTMLResponse)
    def pause_or_resume(
        request: Request,
        user: CanPause,
        conn: Conn,
        action: str,
        endpoint: Annotated[str, Form()],
        reason: Annotated[str, Form()] = "",
        csrf: Annotated[str | None, Form()] = None,
    ) -> RedirectResponse:
        check_csrf(request, user, csrf)
        actor = f"{user.get_name()} (Deliveries page)"
        if action == "pause":
            event = endpoints.pause(
                conn, endpoint, reason=reason.strip() or "paused from the Deliveries page", actor=actor
            )
        elif action == "resume":
            event = endpoints.resume(conn, endpoint, actor=actor, reason=reason.strip() or None)
        else:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no endpoint action {action!r}: pause or resume")
        if event is not None:
            endpoints.notify(event)
        prefix = request.scope.get("root_path", "")
        return RedirectResponse(f"{prefix}/endpoints", status_code=status.HTTP_303_SEE_OTHER)

    return app


def _login_url() -> str | None:
    from airflow.api_fastapi.app import get_auth_manager

    try:
        return get_auth_manager().get_url_login()
    except Exception:  # the page still says 401 when the auth manager cannot name its login page
        log.exception("No login URL from the auth manager")
        return None


def _base_url(request: Request) -> str:
    """Airflow's own address: ``[api] base_url`` when set, else the origin this request came to."""
    from airflow.configuration import conf

    base = conf.get("api", "base_url", fallback="") or ""
    return base if base.startswith("http") else f"{request.url.scheme}://{request.url.netloc}"
