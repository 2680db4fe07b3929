"""What every route of the page needs: the CDR database, the settings, Airflow's address, rendering."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates

from cdr_webhook.db import connect
from cdr_webhook.ledger.schema import migrate
from cdr_webhook.settings import DAG_ID, load_settings
from cdr_webhook.web import airflow_api
from cdr_webhook.web.security import csrf_token, permissions

if TYPE_CHECKING:
    from collections.abc import Iterator

    import psycopg
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


@functools.cache
def _migrated() -> bool:
    # The page may open before the DAG's first run has made (or upgraded) the ledger.
    with connect() as conn:
        migrate(conn)
    return True


def _db() -> Iterator[psycopg.Connection[Any]]:
    """A connection to the CDR database for one request (the ledger migrated once per process)."""
    _migrated()
    with connect() as conn:
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


def base_url(request: Request) -> str:
    """Airflow's own address: ``[api] base_url`` when set, else the origin this request came to."""
    from airflow.configuration import conf

    base = conf.get("api", "base_url", fallback="") or ""
    return base if base.startswith("http") else f"{request.url.scheme}://{request.url.netloc}"
