"""Which endpoint a client's CDRs go to. Pure: no Airflow.

A client with its own HTTP connection ``cdr_webhook_client_<client_id>`` gets its CDRs there; the
others go to ``cdr_webhook`` (or are skipped, with ``unrouted_clients = skip``). What an endpoint
accepts (its filters) is part of its configuration: :mod:`cdr_webhook.endpoint_config`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

CLIENT_CONN_PREFIX = "cdr_webhook_client_"
UNROUTED_CHOICES = ("default", "skip")
#: The names the routing gives endpoints: the default one, and a client's own (a bigint client id).
_ROUTE_NAME = re.compile(r"cdr_webhook(?:_client_(-?[0-9]{1,19}))?")


@dataclasses.dataclass(frozen=True)
class Route:
    """Where one client's CDRs go; ``skip_reason`` set means they are recorded as skipped instead."""

    endpoint: str
    skip_reason: str | None = None


def client_conn_id(client_id: int) -> str:
    """Return the connection id of a client's own endpoint."""
    return f"{CLIENT_CONN_PREFIX}{client_id}"


def is_route_name(endpoint: str) -> bool:
    """Whether the routing could name this endpoint (``cdr_webhook``, ``cdr_webhook_client_<id>``)."""
    return _ROUTE_NAME.fullmatch(endpoint) is not None


def routed_client(endpoint: str) -> int | None:
    """The client whose own endpoint this is (``cdr_webhook_client_<id>``), else None."""
    found = _ROUTE_NAME.fullmatch(endpoint)
    return int(found.group(1)) if found and found.group(1) is not None else None


class Router:
    """
    Routes clients to endpoints, looking each client's connection up once (per run: make one per run).

    :param connection_exists: Tells whether an Airflow connection id exists.
    :param unrouted: ``default`` sends clients without their own connection to ``default_endpoint``;
        ``skip`` records their CDRs as skipped ("no endpoint").
    """

    def __init__(
        self, connection_exists: Callable[[str], bool], *, unrouted: str, default_endpoint: str
    ) -> None:
        if unrouted not in UNROUTED_CHOICES:
            raise ValueError(
                f"unrouted_clients must be one of {', '.join(UNROUTED_CHOICES)}, not {unrouted!r}"
            )
        self._exists = connection_exists
        self._unrouted = unrouted
        self._default = default_endpoint
        self._routes: dict[int | None, Route] = {}

    def route(self, client_id: int | None) -> Route:
        if client_id not in self._routes:
            self._routes[client_id] = self._lookup(client_id)
        return self._routes[client_id]

    def _lookup(self, client_id: int | None) -> Route:
        if client_id is None:
            return Route(self._default)  # the row is invalid anyway; validation records why
        own = client_conn_id(client_id)
        if self._exists(own):
            return Route(own)
        if self._unrouted == "skip":
            return Route(
                own, f"no endpoint: connection {own!r} does not exist and unrouted_clients is 'skip'"
            )
        return Route(self._default)
