from __future__ import annotations

import pytest

from cdr_webhook import routing
from cdr_webhook.routing import Route, Router

EXISTING = {"cdr_webhook_client_7", "cdr_webhook_client_8"}


def router(unrouted: str = "default") -> Router:
    return Router(EXISTING.__contains__, unrouted=unrouted, default_endpoint="cdr_webhook")


def test_clients_with_their_own_connection_go_there_others_to_the_default():
    r = router()
    assert r.route(7) == Route("cdr_webhook_client_7")
    assert r.route(8) == Route("cdr_webhook_client_8")
    assert r.route(9) == Route("cdr_webhook")


def test_skip_mode_names_the_missing_connection():
    route = router("skip").route(9)
    assert route.endpoint == "cdr_webhook_client_9"
    assert route.skip_reason == (
        "no endpoint: connection 'cdr_webhook_client_9' does not exist and unrouted_clients is 'skip'"
    )


def test_each_client_is_looked_up_once():
    looked_up: list[str] = []

    def exists(conn_id: str) -> bool:
        looked_up.append(conn_id)
        return conn_id in EXISTING

    r = Router(exists, unrouted="default", default_endpoint="cdr_webhook")
    for _ in range(100):
        r.route(7)
        r.route(9)
    assert looked_up == ["cdr_webhook_client_7", "cdr_webhook_client_9"]


def test_unknown_unrouted_mode_is_refused():
    with pytest.raises(ValueError, match="unrouted_clients must be one of default, skip, not 'drop'"):
        router("drop")


@pytest.mark.parametrize(
    ("name", "route", "client"),
    [
        ("cdr_webhook", True, None),
        ("cdr_webhook_client_7", True, 7),
        ("cdr_webhook_client_-3", True, -3),
        ("cdr_webhook_client_", False, None),
        ("cdr_webhook_client_7x", False, None),
        ("cdr_db", False, None),
        ("cdr_webhook_client_12345678901234567890", False, None),  # more digits than a bigint has
    ],
)
def test_the_names_the_routing_gives_endpoints(name, route, client):
    assert (routing.is_route_name(name), routing.routed_client(name)) == (route, client)
