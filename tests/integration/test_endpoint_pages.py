"""The Endpoints page's test CDR, in-process (the ``client`` fixture of tests/integration/conftest.py),
sent to a real receiver on 127.0.0.1: who may send it, the CSRF protection, the confirmation, the verdict."""

from __future__ import annotations

import bisect
import datetime as dt
import math
import random
import re
from html import unescape

import pytest

from bench.records import VERDICT_OF
from cdr_webhook import ledger
from cdr_webhook.ledger import backlog, endpoints, events, health, schema
from cdr_webhook.outcome import Attempt, Decision, PostResult
from demo.connections import http_conn
from demo.receiver import Receiver
from tests.support.deployments import API_KEY, SIGNING_SECRET
from tests.support.page import csrf_of, get, post


@pytest.fixture
def receiver(monkeypatch):
    with Receiver(secret=SIGNING_SECRET, api_key=API_KEY) as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_CDR_WEBHOOK", http_conn(server.url, api_key=API_KEY, signing_secret=SIGNING_SECRET)
        )
        yield server


def test_the_endpoints_page_offers_the_test_to_who_may_redeliver(client):
    viewer, admin = (
        get(client, "/endpoints", user="viewer").text,
        get(client, "/endpoints", user="admin").text,
    )
    assert re.search(
        r'<button type="submit" disabled [^>]*aria-label="send a test CDR to cdr_webhook"', viewer
    )
    assert re.search(r'<button type="submit"  aria-label="send a test CDR to cdr_webhook"', admin)


def test_the_confirmation_sends_nothing_and_the_post_sends_one_and_shows_the_verdict(
    client, receiver, cdr_db
):
    page = get(client, "/test-cdr", user="admin", endpoint="cdr_webhook")
    assert page.status_code == 200
    assert "Send the test CDR" in page.text
    assert receiver.url.rsplit("/", 1)[0] in page.text  # the origin it goes to
    assert receiver.received() == []

    response = post(client, "/test-cdr", data={"csrf": csrf_of(page.text), "endpoint": "cdr_webhook"})

    assert response.status_code == 200, response.text
    verdict = re.search(r'id="verdict"><strong>([^<]+)</strong>', response.text).group(1)
    assert unescape(verdict) == "delivered"
    [request] = receiver.received()
    assert request.signature_ok is True
    assert request.cdr_id in response.text
    [event] = events.recent_events(cdr_db, "cdr_webhook")
    assert (event.action, event.actor, event.http_status) == ("tested", "admin (Deliveries page)", 200)
    assert not cdr_db.execute(
        "SELECT 1 FROM cdr_webhook.delivery WHERE cdr_id = %s", (request.cdr_id,)
    ).fetchall()


def test_a_paused_endpoint_is_tested_and_stays_paused(client, receiver, cdr_db):
    endpoints.pause(cdr_db, "cdr_webhook", reason="onboarding", actor="bob")
    page = get(client, "/test-cdr", user="admin", endpoint="cdr_webhook")
    assert "The endpoint is paused: the test goes out all the same" in page.text
    response = post(client, "/test-cdr", data={"csrf": csrf_of(page.text), "endpoint": "cdr_webhook"})
    assert "The endpoint stays paused." in response.text
    assert len(receiver.received()) == 1
    assert endpoints.is_paused(cdr_db, "cdr_webhook")


def test_the_test_takes_the_redelivery_permission_and_the_csrf_token(client, receiver):
    token = csrf_of(get(client, "/endpoints", user="admin").text)
    data = {"csrf": token, "endpoint": "cdr_webhook"}
    viewer_token = csrf_of(get(client, "/endpoints", user="viewer").text)
    assert post(client, "/test-cdr", user="viewer", data=data | {"csrf": viewer_token}).status_code == 403
    assert post(client, "/test-cdr", user="nobody", data=data).status_code == 403
    assert post(client, "/test-cdr", data={"endpoint": "cdr_webhook"}).status_code == 403
    assert post(client, "/test-cdr", data=data, origin="https://evil.example").status_code == 403
    assert post(client, "/test-cdr", data=data, **{"sec-fetch-site": "cross-site"}).status_code == 403
    assert post(client, "/test-cdr", data=data | {"csrf": viewer_token}).status_code == 403
    assert receiver.received() == []
    assert post(client, "/test-cdr", data=data).status_code == 200
    assert len(receiver.received()) == 1


def test_an_unknown_endpoint_is_refused(client, receiver):
    token = csrf_of(get(client, "/endpoints", user="admin").text)
    assert get(client, "/test-cdr", user="admin", endpoint="cdr_db").status_code == 400
    assert post(client, "/test-cdr", data={"csrf": token, "endpoint": "cdr_db"}).status_code == 400
    assert receiver.received() == []


# -- health: the charts against a seeded week of attempts -------------------------------------------

SEEDED = "cdr_webhook_client_9"


def seed_week(cdr_db, now: dt.datetime, count: int = 400) -> list[tuple[dt.datetime, str, int, float]]:
    """``count`` attempts over the last 6.5 days, recorded through the operator's write path; each as
    (when, status, latency ms, commit→POST ms of a first attempt, else None)."""
    rng = random.Random(25)
    seeded = []
    for n in range(count):
        cdr_id = f"seed-{n}"
        sent = now - dt.timedelta(seconds=rng.uniform(0, 6.5 * 86400))
        created = sent - dt.timedelta(seconds=rng.choice([0.4, 1.2, 2.5, 9.0]))
        cdr_db.execute(
            "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status) "
            "VALUES (%s, %s, 9, %s, 'queued')",
            (cdr_id, SEEDED, created),
        )
        tries = rng.choice([1, 1, 1, 2])  # some deliveries take a retry: its second attempt is no pickup
        for number in range(tries):
            status = rng.choice(["delivered", "delivered", "delivered", "queued", "failed"])
            if number == 0 and tries == 2:
                status = "queued"
            latency = rng.choice([3, 12, 40, 90, 180, 450, 2500])
            at = sent + dt.timedelta(seconds=60 * number)
            claim = ledger.Claim(cdr_id, SEEDED, 9, created, "queued", number)
            result = PostResult(200 if status == "delivered" else 503, None, None, latency, at.timestamp())
            decision = Decision(VERDICT_OF[status], error=None if status == "delivered" else "HTTP 503")
            ledger.record_attempts(cdr_db, [Attempt(claim, result, decision, "msg_x")])
            pickup = (at - created).total_seconds() * 1000 if number == 0 else None
            seeded.append((at, status, latency, pickup))
    return seeded


def nearest_rank(values: list[float], percentile: int) -> int:
    """The percentile as the charts state it: the histogram bin's upper edge the true value falls in."""
    ordered = sorted(values)
    value = ordered[math.ceil(percentile / 100 * len(ordered)) - 1]
    index = bisect.bisect_left(health.EDGES_MS, value)
    return health.EDGES_MS[index] if index < len(health.EDGES_MS) else health.BEYOND_MS


def drawn_bars(html: str, chart: str) -> list[dict[str, str]]:
    svg = re.search(rf'<svg [^>]*data-chart="{chart}".*?</svg>', html, re.S).group(0)
    return [
        dict(re.findall(r'data-([a-z]+)="([^"]+)"', g)) for g in re.findall(r'<g class="point" [^>]*>', svg)
    ]


def test_the_charts_show_what_the_ledger_holds_for_a_seeded_week(client, cdr_db):
    now = dt.datetime.now(dt.UTC)
    seeded = seed_week(cdr_db, now)
    step = dt.timedelta(hours=6)
    start = dt.datetime.fromtimestamp(now.timestamp() // 21600 * 21600, dt.UTC) - 27 * step

    html = get(client, "/endpoint", endpoint=SEEDED, period="week").text

    bars = drawn_bars(html, "attempts")
    assert len(bars) == 28
    for i, bar in enumerate(bars):
        low, high = start + i * step, start + (i + 1) * step
        mine = [s for at, s, _, _ in seeded if low <= at < high]
        assert dt.datetime.fromisoformat(bar["at"]) == low
        assert int(bar["delivered"]) == mine.count("delivered"), i
        assert int(bar["failures"]) == len(mine) - mine.count("delivered"), i
        assert int(bar["failed"]) == mine.count("failed"), i
    delivered = sum(1 for _, s, _, _ in seeded if s == "delivered")
    facts = dict(re.findall(r'data-fact="([a-z-]+)">([^<]+)<', html))
    assert int(facts["attempts"]) == len(seeded)
    assert int(facts["delivered"]) == delivered
    assert facts["success-rate"] == f"{100 * delivered / len(seeded):.1f} %"
    latencies = [latency for _, _, latency, _ in seeded]
    pickups = [pickup for _, _, _, pickup in seeded if pickup is not None]
    assert f"p50 ≤ {nearest_rank(latencies, 50)} ms, p95 ≤ {nearest_rank(latencies, 95)} ms" in html
    assert f"p50 ≤ {nearest_rank(pickups, 50)} ms, p95 ≤ {nearest_rank(pickups, 95)} ms" in html
    # Each step's POST latency p95 on the latency chart.
    latency_svg = re.search(r'<svg [^>]*data-chart="latency".*?</svg>', html, re.S).group(0)
    p95s = re.findall(r'data-at="([^"]+)" data-p95="(\d+)"', latency_svg)
    assert len(p95s) == len(
        {at.replace(hour=at.hour // 6 * 6, minute=0, second=0, microsecond=0) for at, *_ in seeded}
    )
    for point in p95s:
        low = dt.datetime.fromisoformat(point[0])
        mine = [latency for at, _, latency, _ in seeded if low <= at < low + step]
        assert int(point[1]) == nearest_rank(mine, 95)

    # The Endpoints page: the last 24 hours, an hour a bar.
    page = get(client, "/endpoints").text
    row = re.search(rf'<svg class="trend" [^>]*aria-label="{SEEDED},.*?</svg>', page, re.S).group(0)
    hour = dt.timedelta(hours=1)
    first = dt.datetime.fromtimestamp(now.timestamp() // 3600 * 3600, dt.UTC) - 23 * hour
    day = [(at, s) for at, s, _, _ in seeded if at >= first]
    trend = drawn_bars(row, "trend")
    assert len(trend) == 24
    assert [int(b["delivered"]) for b in trend] == [
        sum(1 for at, s in day if first + i * hour <= at < first + (i + 1) * hour and s == "delivered")
        for i in range(24)
    ]
    assert f"{100 * sum(s == 'delivered' for _, s in day) / len(day):.1f} % of {len(day)} delivered" in page


def test_the_detail_shows_the_backlog_and_the_last_events(client, cdr_db, monkeypatch):
    endpoints.pause(cdr_db, "cdr_webhook_client_42", reason="410 Gone", actor=endpoints.AUTOMATIC_ACTOR)
    endpoints.resume(cdr_db, "cdr_webhook_client_42", actor="bob")
    events.record_test(
        cdr_db, "cdr_webhook_client_42", actor="alice", verdict="fails at once: 401, check the x-api-key",
        cdr_id="test-1", http_status=401, latency_ms=8, excerpt="bad key",
    )  # fmt: skip
    html = get(client, "/endpoint", endpoint="cdr_webhook_client_42", period="hour").text
    facts = dict(re.findall(r'data-fact="([a-z-]+)">([^<]+)<', html))
    assert (facts["queued"], facts["in-flight"], facts["retrying"]) == ("0", "0", "0")
    events_table = re.search(r'<table id="events">.*?</table>', html, re.S).group(0)
    assert events_table.index("test CDR") < events_table.index("resumed") < events_table.index("paused")
    assert "<td>automatically</td>" in events_table  # the automatic pause, as the Endpoints page says it
    assert "<td>bob</td>" in events_table
    assert "fails at once: 401, check the x-api-key" in events_table
    assert "bad key" in events_table
    assert len(drawn_bars(html, "attempts")) == 12
    assert get(client, "/endpoint", endpoint="nowhere").status_code == 404
    assert get(client, "/endpoint", endpoint="cdr_webhook", period="year").status_code == 422


def test_the_backlog_counts_queued_taken_and_retrying_rows(cdr_db):
    schema.migrate(cdr_db)
    rows = [("a", None, 0), ("b", None, 0), ("c", "run_1", 0), ("d", "run_1", 1), ("e", None, 2)]
    for cdr_id, run_id, attempts in rows:
        cdr_db.execute(
            "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status, run_id, attempts) "
            "VALUES (%s, 'ep', now(), 'queued', %s, %s)",
            (cdr_id, run_id, attempts),
        )
    cdr_db.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status) "
        "VALUES ('f', 'ep', now(), 'delivered')"
    )
    assert backlog.backlog(cdr_db, "ep") == backlog.Backlog(queued=2, in_flight=1, retrying=2)


def test_the_backlog_chart_shows_each_steps_biggest_snapshot(client, cdr_db):
    # A day of snapshots as the select step leaves them (some buckets without one), another endpoint's,
    # and one older than the day; each hour's bar is its biggest snapshot, the latest of equals.
    now = dt.datetime.now(dt.UTC)
    cdr_db.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status) "
        "VALUES ('waiting', %s, 9, now(), 'queued')",
        (SEEDED,),
    )
    schema.migrate(cdr_db)
    rng = random.Random(14)
    latest = dt.datetime.fromtimestamp(now.timestamp() // 300 * 300, dt.UTC)
    snapshots = []
    for n in range(0, 26 * 12):
        if rng.random() < 0.3:
            continue
        bucket = latest - n * dt.timedelta(minutes=5)
        counts = (rng.choice([0, 1, 5, 40]), rng.choice([0, 2, 3]), rng.choice([0, 1, 7]))
        snapshots.append((bucket, *counts))
        cdr_db.execute(
            "INSERT INTO cdr_webhook.endpoint_backlog (endpoint, bucket, queued, in_flight, retrying) "
            "VALUES (%s, %s, %s, %s, %s), ('cdr_webhook', %s, 900, 900, 900)",
            (SEEDED, bucket, *counts, bucket),
        )

    html = get(client, "/endpoint", endpoint=SEEDED, period="day").text

    hour = dt.timedelta(hours=1)
    first = dt.datetime.fromtimestamp(now.timestamp() // 3600 * 3600, dt.UTC) - 23 * hour
    svg = re.search(r'<svg [^>]*data-chart="backlog".*?</svg>', html, re.S).group(0)
    bars = [
        dict(re.findall(r'data-([a-z]+)="([^"]+)"', g)) for g in re.findall(r'<g class="point" [^>]*>', svg)
    ]
    assert len(bars) == 24
    for i, bar in enumerate(bars):
        mine = [s for s in snapshots if first + i * hour <= s[0] < first + (i + 1) * hour]
        biggest = max(mine, key=lambda s: (s[1] + s[2] + s[3], s[0]), default=(None, 0, 0, 0))
        assert dt.datetime.fromisoformat(bar["at"]) == first + i * hour
        assert (int(bar["queued"]), int(bar["inflight"]), int(bar["retrying"])) == biggest[1:], i
    peak = max(sum(s[1:]) for s in snapshots if s[0] >= first)
    assert f"at most {peak} queued CDR(s)" in svg
    facts = dict(re.findall(r'data-fact="([a-z-]+)">([^<]+)<', html))
    assert (facts["queued"], facts["in-flight"], facts["retrying"]) == ("1", "0", "0")  # now, from the ledger
