"""Airflow connections, in their JSON form for ``AIRFLOW_CONN_*`` variables (demo and tests)."""

from __future__ import annotations

import json
from typing import Any

from psycopg.conninfo import conninfo_to_dict


def postgres_conn(dsn: str) -> str:
    """The Airflow Postgres connection of a libpq conninfo (a Unix socket directory works as host)."""
    params = conninfo_to_dict(dsn)
    return json.dumps(
        {
            "conn_type": "postgres",
            "host": params.get("host"),
            "port": int(params["port"]) if params.get("port") else None,
            "login": params.get("user"),
            "password": params.get("password") or None,
            "schema": params.get("dbname"),
        }
    )


def http_conn(url: str, *, api_key: str | None = None, **extra: Any) -> str:
    """An endpoint's Airflow HTTP connection: the URL as host, the API key as password, the extras."""
    return json.dumps({"conn_type": "http", "host": url, "password": api_key, "extra": extra})
