from __future__ import annotations

from decimal import Decimal

import pytest

from cdr_webhook.routing import EndpointFilters, Route, Router

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
    r = router()
    for _ in range(100):
        r.route(7)
        r.route(9)
    assert r.lookups == 2


def test_unknown_unrouted_mode_is_refused():
    with pytest.raises(ValueError, match="unrouted_clients must be one of default, skip, not 'drop'"):
        router("drop")


def test_filters():
    filters = EndpointFilters.from_extra(
        "cdr_webhook_client_7", {"leg_types": [1], "min_billed_duration": 1, "campaign_ids": [12, 13]}
    )
    ok = {"leg_type": 1, "billed_duration": 5, "campaign_id": 12}
    assert filters.exclusion(ok) is None
    assert filters.exclusion(ok | {"leg_type": 2}) == (
        "filtered out by cdr_webhook_client_7 extra leg_types=[1]: leg_type is 2"
    )
    assert filters.exclusion(ok | {"billed_duration": 0}) == (
        "filtered out by cdr_webhook_client_7 extra min_billed_duration=1: billed_duration is 0"
    )
    assert "billed_duration is None" in filters.exclusion(ok | {"billed_duration": None})
    assert filters.exclusion(ok | {"campaign_id": 99}) == (
        "filtered out by cdr_webhook_client_7 extra campaign_ids=[12, 13]: campaign_id is 99"
    )
    assert EndpointFilters.from_extra("x", {}).exclusion(ok | {"leg_type": 2}) is None
    assert EndpointFilters.from_extra("x", {"min_billed_duration": "0.5"}).min_billed_duration == Decimal(
        "0.5"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"leg_types": 1}, "extra 'leg_types' must be a list of integers, not 1"),
        ({"campaign_ids": ["a"]}, "extra 'campaign_ids' must be a list of integers"),
        ({"min_billed_duration": "long"}, "extra 'min_billed_duration' must be a number, not 'long'"),
    ],
)
def test_malformed_filters_name_connection_and_extra(extra, message):
    with pytest.raises(ValueError, match=f"connection 'c': {message}"):
        EndpointFilters.from_extra("c", extra)
