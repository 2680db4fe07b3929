"""The Endpoints page's own pages: an endpoint's health (charts and last events), and a test CDR
(confirm, then POST, then its verdict).

The test takes what a redelivery takes (the ``cdr_webhook`` DAG's task instances, PUT) and the page's
CSRF token; it is sent by :func:`cdr_webhook.deliver.sample.send_test`, as the CLI's ``endpoints test``.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse

from cdr_webhook.adapters import load_endpoint, load_owner
from cdr_webhook.deliver.sample import TEST_HEADER, send_test
from cdr_webhook.endpoint_config import EndpointConfigError
from cdr_webhook.ledger import backlog, endpoints, events, health
from cdr_webhook.web import charts
from cdr_webhook.web.deps import Conn, render, settings, templates
from cdr_webhook.web.security import CanClear, CanView, check_csrf

log = logging.getLogger(__name__)

router = APIRouter()
templates.env.globals["trend_chart"] = charts.trend
templates.env.globals["latency_text"] = health.describe_latency


def _checked(conn: Conn, endpoint: str) -> str:
    try:
        return endpoints.check_pausable(conn, endpoint)
    except endpoints.EndpointNameError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None


def owner_of(endpoint: str) -> dict[str, object]:
    """The endpoint's owner as the pages show it: masked contacts, or why its owner extras are unusable."""
    try:
        contact = load_owner(endpoint)
    except EndpointConfigError as err:
        return {"owner": [], "owner_problem": None if err.field is None else str(err)}
    return {"owner": contact.masked() if contact else [], "owner_problem": None}


def _limits(endpoint: str) -> dict[str, object] | None:
    """The endpoint's in-flight and rate limits as its connection sets them (None: it cannot be read)."""
    defaults = settings()
    try:
        config = load_endpoint(endpoint)
    except EndpointConfigError:
        return None  # the pause's reason and the Endpoints page say why
    return {
        "in_flight": config.in_flight_limit(defaults.max_in_flight_per_endpoint),
        "rate": config.rate_limit(defaults.rate_limit_per_second),
    }


#: The events the detail page lists, newest first.
EVENTS_SHOWN = 20


@router.get("/endpoint", response_class=HTMLResponse)
def endpoint_page(
    request: Request,
    user: CanView,
    conn: Conn,
    endpoint: Annotated[str, Query(max_length=250)],
    period: Annotated[str, Query(pattern="^(hour|day|week)$")] = "day",
) -> HTMLResponse:
    """One endpoint's health over the last hour, day or week, its backlog now and over the period, and its
    last events."""
    found = endpoints.list_endpoints(conn, endpoint=endpoint)
    if not found:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no endpoint {endpoint!r} in the ledger")
    now = dt.datetime.now(dt.UTC)
    series = health.series(conn, endpoint, health.PERIODS[period], now=now)
    backlog_over = backlog.backlog_series(conn, endpoint, health.PERIODS[period], now=now)
    return render(
        request, "endpoint.html", user, state=found[0], period=period, periods=list(health.PERIODS),
        series=series, backlog=backlog.backlog(conn, endpoint), limits=_limits(endpoint),
        events=events.recent_events(conn, endpoint, limit=EVENTS_SHOWN), automatic=endpoints.AUTOMATIC_ACTOR,
        charts={
            "attempts": charts.attempts_chart(series),
            "latency": charts.latency_chart(series),
            "pickup": charts.latency_chart(series, pickup=True),
            "backlog": charts.backlog_chart(backlog_over),
        },
    )  # fmt: skip


@router.get("/test-cdr", response_class=HTMLResponse)
def confirm_test(
    request: Request, user: CanView, conn: Conn, endpoint: Annotated[str, Query(max_length=250)]
) -> HTMLResponse:
    """Ask before a test CDR goes out: where it goes, and what it is."""
    _checked(conn, endpoint)
    try:
        origin, problem = load_endpoint(endpoint).origin, None
    except EndpointConfigError as err:
        origin, problem = None, str(err)
    return render(
        request, "test_cdr.html", user, endpoint=endpoint, origin=origin, problem=problem,
        paused=endpoints.is_paused(conn, endpoint), outcome=None, header=TEST_HEADER,
    )  # fmt: skip


@router.post("/test-cdr", response_class=HTMLResponse)
def post_test(
    request: Request,
    user: CanClear,
    conn: Conn,
    endpoint: Annotated[str, Form(max_length=250)],
    csrf: Annotated[str | None, Form()] = None,
) -> HTMLResponse:
    """Send one test CDR now, paused or not; the verdict in words, recorded as the endpoint's event."""
    check_csrf(request, user, csrf)
    _checked(conn, endpoint)
    outcome = send_test(conn, endpoint, actor=f"{user.get_name()} (Deliveries page)")
    log.info("User %s sent a test CDR to %s: %s", user.get_name(), endpoint, outcome.verdict)
    return render(
        request, "test_cdr.html", user, endpoint=endpoint, origin=None, problem=None,
        paused=endpoints.is_paused(conn, endpoint), outcome=outcome, header=TEST_HEADER,
    )  # fmt: skip
