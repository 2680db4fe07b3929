"""A run's view of the endpoints: client routes, each connection's configuration read once, the paused,
the throttled failing ones, and the holding of an endpoint whose connection cannot be used."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from cdr_webhook.endpoint_config import EndpointConfig, EndpointConfigError
from cdr_webhook.ledger import endpoints
from cdr_webhook.routing import Route, Router
from cdr_webhook.settings import DEFAULT_ENDPOINT_CONN_ID, Settings

if TYPE_CHECKING:
    from collections.abc import Callable

    import psycopg

    from cdr_webhook import ledger

    #: ``conn_id -> its endpoint configuration``, None when no such connection exists; raises
    #: :class:`~cdr_webhook.endpoint_config.EndpointConfigError` when the connection cannot be used.
    Connections = Callable[[str], EndpointConfig | None]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunEndpoints:
    """Per-run knowledge of endpoints: client routes and configurations, each connection read once."""

    connections: Connections
    router: Router
    paused: set[str]
    held: list[endpoints.EndpointEvent] = dataclasses.field(default_factory=list)

    def routes(self, clients: list[int | None]) -> dict[int | None, Route]:
        return {client: self.router.route(client) for client in clients}

    def config(self, endpoint: str) -> EndpointConfig:
        """The endpoint's configuration; :class:`EndpointConfigError` when it cannot be used or is gone."""
        config = self.connections(endpoint)
        if config is None:
            raise EndpointConfigError.missing(endpoint)
        return config

    def exists(self, endpoint: str) -> bool:
        """Whether the connection exists, usable or not (a malformed one is held, not re-routed)."""
        try:
            return self.connections(endpoint) is not None
        except EndpointConfigError:
            return True

    def throttles(self, conn: psycopg.Connection[Any], settings: Settings) -> dict[str, int]:
        """
        Failing endpoints and the claims each may have in flight: its in-flight limit.

        An endpoint whose last attempt failed gets no more CDRs claimed at a time, across all live
        runs, than its in-flight limit, and none while a live run waits to retry one of them
        (:func:`~cdr_webhook.ledger.assign`): its retries hold up the run that owns them, and no
        second run is to be held while others' CDRs wait.
        """
        limits = {}
        for endpoint in endpoints.failing_endpoints(conn):
            try:
                limits[endpoint] = self.config(endpoint).in_flight_limit(settings.max_in_flight_per_endpoint)
            except EndpointConfigError:  # held when its CDRs are claimed
                limits[endpoint] = settings.max_in_flight_per_endpoint
        return limits


def known_endpoints(
    conn: psycopg.Connection[Any], settings: Settings, connections: Connections
) -> RunEndpoints:
    """This run's view of the endpoints: the router over the connections, and the paused ones."""
    known = RunEndpoints(
        connections=connections,
        router=Router(
            lambda conn_id: known.exists(conn_id),
            unrouted=settings.unrouted_clients,
            default_endpoint=DEFAULT_ENDPOINT_CONN_ID,
        ),
        paused=endpoints.paused_endpoints(conn),
    )
    if known.paused:
        log.warning("Paused endpoints (their CDRs wait, queued): %s", ", ".join(sorted(known.paused)))
    return known


def hold_misconfigured(
    conn: psycopg.Connection[Any], claims: list[ledger.Claim], known: RunEndpoints
) -> list[ledger.Claim]:
    """
    Hold the CDRs of endpoints whose connection cannot be used; return the other claims.

    Such an endpoint is paused with the reason (the alert goes out once this transaction commits)
    and its CDRs go back to the queue, in order, with the reason on their ledger rows: fixing the
    connection and resuming the endpoint sends them. Every other endpoint delivers in this run.
    """
    held: set[str] = set()
    for endpoint in dict.fromkeys(claim.endpoint for claim in claims):
        try:
            known.config(endpoint)
        except EndpointConfigError as err:
            log.error("Endpoint %s is held, its CDRs stay queued: %s", endpoint, err)
            event = endpoints.hold(conn, endpoint, [c for c in claims if c.endpoint == endpoint], err)
            if event is not None:
                known.held.append(event)
            held.add(endpoint)
    return [claim for claim in claims if claim.endpoint not in held]
