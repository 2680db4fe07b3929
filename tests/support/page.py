"""The Deliveries page's test users and auth managers, and requests to the page in-process as one of them
(the fixtures that populate the ledger and mount the page are in tests/integration/conftest.py)."""

from __future__ import annotations

import datetime as dt
import json
import re
from html import unescape
from typing import Any

DAY = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
USERS = "admin:admin,viewer:viewer,nobody:"


def _simple_auth_manager() -> type:
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    return SimpleAuthManager


class EveryDagButCdrWebhook(_simple_auth_manager()):  # type: ignore[misc]
    """The SimpleAuthManager, except that nobody has any access to the ``cdr_webhook`` DAG."""

    def is_authorized_dag(self, *, method, user, access_entity=None, details=None) -> bool:
        if details is not None and details.id == "cdr_webhook":
            return False
        return super().is_authorized_dag(
            method=method, user=user, access_entity=access_entity, details=details
        )


SIMPLE = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"


def get(http, path: str, user: str | None = "viewer", **params: Any):
    http.cookies.clear()
    if user:
        http.cookies.set("_token", http.tokens[user])
    return http.get(f"/cdr-webhook{path}", params=params)


def post(http, path: str, user: str = "admin", data: dict | None = None, **headers: str):
    http.cookies.clear()
    http.cookies.set("_token", http.tokens[user])
    return http.post(f"/cdr-webhook{path}", data=data or {}, headers=headers, follow_redirects=False)


def listed(html: str) -> list[str]:
    """The cdr_ids of the list's rows, in order."""
    return [json.loads(unescape(key))[0] for key in re.findall(r'name="key" value=\'([^\']+)\'', html)]


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)
