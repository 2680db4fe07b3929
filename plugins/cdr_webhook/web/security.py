"""Who may use the page: the Airflow user's access to the ``cdr_webhook`` DAG, and CSRF protection.

Airflow does not authenticate plugin apps: every route depends on one of the checks below. They use
Airflow's own ``get_user`` (the ``Authorization`` header, else the UI's ``_token`` cookie; no token
is a 401) and ``requires_access_dag``, which asks ``get_auth_manager()``: helpers that read
``request.app.state`` (``AuthManagerDep``) would find the plugin's sub-app there, not Airflow's.
Every state change is a POST carrying a token signed for the user (:func:`csrf_token`), refused
when the browser says it comes from another site or origin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import get_user, requires_access_dag
from airflow.configuration import conf
from fastapi import Depends, HTTPException, Request, status
from itsdangerous import BadSignature, URLSafeTimedSerializer

from cdr_webhook.settings import DAG_ID

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow.api_fastapi.auth.managers.base_auth_manager import ResourceMethod

_CSRF_SALT = "cdr-webhook-page-csrf"
_CSRF_MAX_AGE_SECONDS = 12 * 3600


def requires(method: ResourceMethod, entity: DagAccessEntity | None = None) -> Callable[..., BaseUser]:
    """A dependency returning the request's Airflow user if allowed ``method`` on the DAG, else 401/403."""
    allowed = requires_access_dag(method, entity, param_dag_id=DAG_ID)

    # A default, not an Annotated[]: string annotations (from __future__) cannot name this closure's
    # variable, and FastAPI would take the parameter for a query string.
    def check(user: Annotated[BaseUser, Depends(get_user)], _: None = Depends(allowed)) -> BaseUser:  # noqa: B008
        return user

    return check


#: Read the page; clear task instances (redeliver); trigger runs; pause or resume endpoints.
CanView = Annotated[BaseUser, Depends(requires("GET"))]
CanClear = Annotated[BaseUser, Depends(requires("PUT", DagAccessEntity.TASK_INSTANCE))]
CanTrigger = Annotated[BaseUser, Depends(requires("POST", DagAccessEntity.RUN))]
CanPause = Annotated[BaseUser, Depends(requires("PUT"))]


def permissions(user: BaseUser) -> dict[str, bool]:
    """Which actions the page offers ``user`` enabled (each POST checks again: this only shapes the page)."""
    from airflow.api_fastapi.app import get_auth_manager

    def may(method: ResourceMethod, entity: DagAccessEntity | None = None) -> bool:
        return get_auth_manager().is_authorized_dag(
            method=method, access_entity=entity, details=DagDetails(id=DAG_ID), user=user
        )

    return {
        "redeliver": may("PUT", DagAccessEntity.TASK_INSTANCE),
        "trigger": may("POST", DagAccessEntity.RUN),
        "pause": may("PUT"),
    }


def caller_token(request: Request) -> str:
    """The caller's own Airflow token (header, else the UI's cookie): the page acts on Airflow as them."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.cookies.get(COOKIE_NAME_JWT_TOKEN, "")


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(conf.get("api", "secret_key"), salt=_CSRF_SALT)


def csrf_token(user: BaseUser) -> str:
    """A token for the user's forms: signed with Airflow's ``[api] secret_key``, valid 12 hours."""
    return _serializer().dumps(user.get_id())


def check_csrf(request: Request, user: BaseUser, token: str | None) -> None:
    """Refuse (403) a state change from another site, or without this user's form token."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-site request refused")
    origin = request.headers.get("origin")
    if origin and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"request from origin {origin} refused")
    try:
        owner = _serializer().loads(token or "", max_age=_CSRF_MAX_AGE_SECONDS)
    except BadSignature:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "the form's token is missing or expired: reload the page"
        ) from None
    if owner != user.get_id():
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the form's token belongs to another user")
