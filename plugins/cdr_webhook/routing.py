"""Which endpoint a client's CDRs go to, and which CDRs an endpoint's filters keep. Pure: no Airflow.

A client with its own HTTP connection ``cdr_webhook_client_<client_id>`` gets its CDRs there; the
others go to ``cdr_webhook`` (or are skipped, with ``unrouted_clients = skip``). A connection's extra
may narrow what it receives: ``leg_types``, ``min_billed_duration``, ``campaign_ids``.
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

CLIENT_CONN_PREFIX = "cdr_webhook_client_"
UNROUTED_CHOICES = ("default", "skip")


@dataclasses.dataclass(frozen=True)
class Route:
    """Where one client's CDRs go; ``skip_reason`` set means they are recorded as skipped instead."""

    endpoint: str
    skip_reason: str | None = None


def client_conn_id(client_id: int) -> str:
    """Return the connection id of a client's own endpoint."""
    return f"{CLIENT_CONN_PREFIX}{client_id}"


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
        self.lookups = 0

    def route(self, client_id: int | None) -> Route:
        if client_id not in self._routes:
            self._routes[client_id] = self._lookup(client_id)
        return self._routes[client_id]

    def _lookup(self, client_id: int | None) -> Route:
        if client_id is None:
            return Route(self._default)  # the row is invalid anyway; validation records why
        own = client_conn_id(client_id)
        self.lookups += 1
        if self._exists(own):
            return Route(own)
        if self._unrouted == "skip":
            return Route(
                own, f"no endpoint: connection {own!r} does not exist and unrouted_clients is 'skip'"
            )
        return Route(self._default)


@dataclasses.dataclass(frozen=True)
class EndpointFilters:
    """The CDRs an endpoint wants, from its connection extra; None means no restriction."""

    endpoint: str
    leg_types: frozenset[int] | None = None
    min_billed_duration: Decimal | None = None
    campaign_ids: frozenset[int] | None = None

    @classmethod
    def from_extra(cls, endpoint: str, extra: Mapping[str, Any]) -> EndpointFilters:
        """Read the filters of a connection extra; a malformed one raises, naming connection and key."""
        return cls(
            endpoint=endpoint,
            leg_types=_int_set(endpoint, "leg_types", extra.get("leg_types")),
            min_billed_duration=_number(endpoint, "min_billed_duration", extra.get("min_billed_duration")),
            campaign_ids=_int_set(endpoint, "campaign_ids", extra.get("campaign_ids")),
        )

    def exclusion(self, payload: Mapping[str, Any]) -> str | None:
        """Return why the endpoint does not want this CDR (naming the filter), or None to send it."""
        if self.leg_types is not None and payload.get("leg_type") not in self.leg_types:
            return self._reason("leg_types", sorted(self.leg_types), f"leg_type is {payload.get('leg_type')}")
        billed = payload.get("billed_duration")
        if self.min_billed_duration is not None and (billed is None or billed < self.min_billed_duration):
            return self._reason(
                "min_billed_duration", self.min_billed_duration, f"billed_duration is {billed}"
            )
        if self.campaign_ids is not None and payload.get("campaign_id") not in self.campaign_ids:
            return self._reason(
                "campaign_ids", sorted(self.campaign_ids), f"campaign_id is {payload.get('campaign_id')}"
            )
        return None

    def _reason(self, name: str, wanted: object, actual: str) -> str:
        return f"filtered out by {self.endpoint} extra {name}={wanted}: {actual}"


def _int_set(endpoint: str, name: str, value: Any) -> frozenset[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"connection {endpoint!r}: extra {name!r} must be a list of integers, not {value!r}")
    return frozenset(value)


def _number(endpoint: str, name: str, value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise InvalidOperation
        number = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"connection {endpoint!r}: extra {name!r} must be a number, not {value!r}") from None
    return number
