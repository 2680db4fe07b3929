"""The Airflow plugin of the CDR webhook: the Deliveries page inside Airflow's UI.

Airflow finds it through the package's ``airflow.plugins`` entry point (installed from the wheel), or,
in a source checkout, through ``plugins/cdr_webhook_plugin.py``, which imports it (``.airflowignore``
keeps the plugin loader out of this package). The api-server mounts the page's FastAPI app at
``/cdr-webhook``; the nav entry shows it inside the UI, and a tab on every task instance shows that
task's delivery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.plugins_manager import AirflowPlugin

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping

URL_PREFIX = "/cdr-webhook"


class _PageApp:
    """An ASGI app that builds the page's FastAPI app on its first request.

    Every Airflow process loads plugins (a task's too); only the api-server ever serves the page, so
    FastAPI, Jinja and Airflow's API modules are imported there alone.
    """

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if self._app is None:
            from cdr_webhook.web.app import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


class CdrWebhookPlugin(AirflowPlugin):
    """The Deliveries page (``/cdr-webhook``), in Airflow's nav and on each task instance."""

    name = "cdr_webhook"
    fastapi_apps = [
        {"app": _PageApp(), "url_prefix": URL_PREFIX, "name": "CDR webhook deliveries"},
    ]
    external_views = [
        {
            "name": "CDR deliveries",
            "href": f"{URL_PREFIX}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "cdr-deliveries",
            "icon": f"{URL_PREFIX}/static/icon.svg",
        },
        {
            "name": "CDR delivery",
            "href": (
                f"{URL_PREFIX}/task?dag_id={{DAG_ID}}&run_id={{RUN_ID}}&task_id={{TASK_ID}}"
                "&map_index={MAP_INDEX}"
            ),
            "destination": "task_instance",
            "url_route": "cdr-delivery",
        },
    ]
