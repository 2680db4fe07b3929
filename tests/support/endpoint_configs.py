"""Endpoint lookups for select-step tests: connection ids with their extras, parsed like the DAG's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdr_webhook.endpoint_config import EndpointConfig, parse_endpoint

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


def configs(extras: Mapping[str, Mapping[str, Any]]) -> Callable[[str], EndpointConfig | None]:
    """``conn_id -> EndpointConfig`` for the given connections (None for any other id), as Airflow's."""

    def lookup(conn_id: str) -> EndpointConfig | None:
        if conn_id not in extras:
            return None
        return parse_endpoint(conn_id, host="https://hooks.example.com/cdr", extra=dict(extras[conn_id]))

    return lookup
