"""The Deliveries page's routes, in-process, on real PostgreSQL with a populated ledger, and Airflow's
own SimpleAuthManager issuing real tokens (roles: admin, viewer, and a user with no role at all).

The page is mounted under ``/cdr-webhook`` in a parent app, as the api-server mounts it. The actions
that call Airflow's REST API (redeliver, runs) run against a real api-server in
tests/e2e/test_deliveries_page_e2e.py; here, their refusals.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from html import unescape

import pytest

from cdr_webhook.web import deliveries
from tests.support.deployments import API_KEY, SIGNING_SECRET
from tests.support.page import DAY, csrf_of, get, listed, post

# -- auth ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/", "/delivery?cdr_id=x&endpoint=y", "/completeness", "/endpoints", "/task", "/static/style.css"],
)
def test_anonymous_requests_get_401(client, path):
    response = get(client, path, user=None)
    assert response.status_code == 401, response.text
    assert "Not authenticated" in response.text
    assert "Log in to Airflow" in response.text


def test_a_user_without_access_to_the_dag_gets_403_and_sees_no_delivery(client, populated):
    response = get(client, "/", user="nobody")
    assert response.status_code == 403
    assert populated["failed_42"] not in response.text
    assert (
        post(client, "/endpoints/pause", user="nobody", data={"endpoint": "cdr_webhook"}).status_code == 403
    )


@pytest.mark.parametrize("client", ["tests.support.page.EveryDagButCdrWebhook"], indirect=True)
def test_access_to_other_dags_is_not_enough(client):
    """The page asks about the cdr_webhook DAG itself: an admin of every other DAG is refused."""
    for user in ("viewer", "admin"):
        assert get(client, "/", user=user).status_code == 403
        assert get(client, "/endpoints", user=user).status_code == 403


def test_a_viewer_reads_but_may_not_change_anything(client, cdr_db):
    page = get(client, "/endpoints")
    assert page.status_code == 200
    assert get(client, "/static/style.css").headers["content-type"].startswith("text/css")
    # The page offers a viewer its actions disabled; an admin gets them enabled.
    viewer, admin = get(client, "/", user="viewer").text, get(client, "/", user="admin").text
    assert re.search(r"<button [^>]*disabled[^>]*>Redeliver selected", viewer)
    assert not re.search(r"<button [^>]*disabled[^>]*>Redeliver selected", admin)
    assert "may not do this" in page.text
    token = csrf_of(page.text)
    for path in ("/endpoints/pause", "/redeliver", "/runs"):
        data = {"csrf": token, "endpoint": "cdr_webhook", "key": '["a", "b"]', "policy": "all"}
        assert post(client, path, user="viewer", data=data).status_code == 403, path
    assert not cdr_db.execute("SELECT paused FROM cdr_webhook.endpoint_state WHERE paused").fetchall()


def test_an_invalid_token_is_refused(client):
    client.cookies.clear()
    client.cookies.set("_token", "not-a-jwt")
    assert client.get("/cdr-webhook/").status_code == 403  # Airflow's get_user: an invalid JWT is a 403


# -- the list --------------------------------------------------------------------------------------


def test_the_list_is_newest_first_and_pages_by_keyset(client, populated):
    first = get(client, "/")
    assert first.status_code == 200
    rows = listed(first.text)
    assert len(rows) == 16  # every ledger row; the never-queued CDR has none
    assert populated["never"] not in rows
    assert rows[0] == populated["by_status"]["queued"][0]  # the newest

    seen, cursor = [], None
    for _ in range(10):
        response = get(client, "/", **({"cursor": cursor} if cursor else {}))
        seen += listed(response.text)
        found = re.search(r'href="/cdr-webhook/\?cursor=([^"]+)" rel="next"', response.text)
        if not found:
            break
        cursor = unescape(found.group(1))
    assert seen == rows


def test_pages_of_the_data_layer_continue_exactly_where_the_last_stopped(cdr_db, populated):
    everything = deliveries.list_deliveries(cdr_db, deliveries.Filters(), limit=100).rows
    pages, cursor = [], None
    while True:
        page = deliveries.list_deliveries(cdr_db, deliveries.Filters(), cursor=cursor, limit=3)
        pages.append([row.cdr_id for row in page.rows])
        cursor = page.next_cursor
        if cursor is None:
            break
    assert [cdr for page in pages for cdr in page] == [row.cdr_id for row in everything]
    assert all(len(page) == 3 for page in pages[:-1])
    keys = [(row.cdr_created_at, row.cdr_id) for row in everything]
    assert keys == sorted(keys, reverse=True)


def test_filters_client_status_endpoint_and_dates(client, populated):
    assert listed(get(client, "/", status="failed", **{"client": "42"}).text) == [populated["failed_42"]]
    assert set(listed(get(client, "/", endpoint="cdr_webhook_client_42").text)) == {
        populated["failed_42"],
        *[
            c
            for c in populated["by_status"]["delivered"]
            if c in listed(get(client, "/", **{"client": "42"}).text)
        ],
    }
    day_one = listed(get(client, "/", since="2026-11-21", to="2026-11-21").text)
    assert len(day_one) == 3
    assert set(listed(get(client, "/", status="delivered", since="2026-11-20", to="2026-11-20").text)) == set(
        populated["by_status"]["delivered"][:12]
    )


def test_search_by_cdr_id_and_by_phone_number(client, populated):
    target = populated["failed_42"]
    assert listed(get(client, "/", q=target).text) == [target]
    assert listed(get(client, "/", q="+15550100042").text) == [target]
    assert listed(get(client, "/", q="+19999999999").text) == []


def test_a_row_shows_attempts_http_status_error_latency_and_task_links(client, populated):
    html = get(client, "/", q=populated["failed_42"]).text
    assert "HTTP 400 Bad Request" in html
    assert '<td class="num">2</td>' in html  # attempts
    assert '<td class="num">400</td>' in html
    assert "12 ms" in html
    assert 'href="/dags/cdr_webhook/runs/manual__1/tasks/post_cdr/mapped/10"' in html


def test_bad_filters_are_named(client):
    response = get(client, "/", **{"client": "forty-two"})
    assert response.status_code == 400
    assert "client: &#39;forty-two&#39; is not a whole number" in response.text
    assert get(client, "/", cursor="garbage").status_code == 400


# -- detail ----------------------------------------------------------------------------------------


def test_the_detail_shows_every_attempt_and_the_payload_as_sent_now_without_secrets(
    client, populated, cdr_db
):
    response = get(client, "/delivery", cdr_id=populated["failed_42"], endpoint="cdr_webhook_client_42")
    assert response.status_code == 200
    html = response.text
    # Two attempts, latest first, each with its outcome and excerpt.
    assert html.index("HTTP 400 Bad Request") < html.index("HTTP 503 Service Unavailable")
    assert "answer 503" in html
    assert "answer 400" in html
    # Client 42 has no connection of its own here: the page says so instead of a request.
    assert "endpoint configuration" in html
    # The pick-up latency: from the CDR's created_at to its first POST (attempt 1's time).
    first, created = cdr_db.execute(
        "SELECT a.at, d.cdr_created_at FROM cdr_webhook.delivery_attempt AS a "
        "JOIN cdr_webhook.delivery AS d USING (cdr_id, endpoint) "
        "WHERE a.cdr_id = %s AND a.endpoint = 'cdr_webhook_client_42' AND a.attempt = 1",
        (populated["failed_42"],),
    ).fetchone()
    assert f"{(first - created).total_seconds():.1f} s after created" in html

    response = get(client, "/delivery", cdr_id=populated["by_status"]["delivered"][0], endpoint="cdr_webhook")
    html = unescape(response.text)
    assert '"phone_number": "+34650123456"' in html  # built from the source row
    assert '"cost": 0.0525' in html
    assert "webhook-signature" in html
    assert "x-api-key" in html
    for secret in (API_KEY, SIGNING_SECRET, SIGNING_SECRET.removeprefix("whsec_"), "s3cret-path"):
        assert secret not in html
    assert "https://hooks.example" in html


def test_the_task_instance_tab_opens_that_tasks_delivery(client, populated):
    response = get(
        client, "/task", dag_id="cdr_webhook", run_id="manual__1", task_id="post_cdr", map_index="10"
    )
    assert response.status_code == 200
    assert populated["failed_42"] in response.text
    assert "HTTP 400 Bad Request" in response.text
    other = get(
        client, "/task", dag_id="cdr_webhook", run_id="manual__1", task_id="select_cdrs", map_index="-1"
    )
    assert "owns no delivery" in other.text


def test_an_unknown_delivery_is_404(client):
    assert get(client, "/delivery", cdr_id="nope", endpoint="cdr_webhook").status_code == 404


# -- completeness ----------------------------------------------------------------------------------


def test_completeness_per_client_and_day(client, cdr_db, populated):
    days = deliveries.completeness(
        cdr_db, relation="cdr_webhook_source", start=DAY.date(), end=(DAY + dt.timedelta(days=3)).date()
    )
    table = {(d.client_id, d.day.isoformat()): d for d in days}
    assert table[(1, "2026-11-20")].in_source == table[(1, "2026-11-20")].delivered == 12
    assert table[(1, "2026-11-20")].complete
    assert (table[(42, "2026-11-21")].failed, table[(42, "2026-11-21")].delivered) == (1, 1)
    two = table[(2, "2026-11-22")]
    assert (two.in_source, two.queued, two.never_queued, two.complete) == (2, 1, 1, False)

    html = get(client, "/completeness", since="2026-11-20", to="2026-11-22").text
    assert "send never queued" in html
    assert "retry failed" in html
    assert get(client, "/completeness", since="2026-01-01", to="2026-12-31").status_code == 400


# -- endpoints and CSRF ----------------------------------------------------------------------------


def test_endpoints_show_state_and_pause_resume_record_who(client, cdr_db):
    page = get(client, "/endpoints", user="admin")
    assert "cdr_webhook_client_42" in page.text
    assert "active" in page.text
    token = csrf_of(page.text)
    response = post(
        client, "/endpoints/pause", data={"csrf": token, "endpoint": "cdr_webhook", "reason": "maint"}
    )
    assert response.status_code == 303
    state = cdr_db.execute(
        "SELECT paused, reason, changed_by FROM cdr_webhook.endpoint_state WHERE endpoint = 'cdr_webhook'"
    ).fetchone()
    assert state == (True, "maint", "admin (Deliveries page)")
    html = get(client, "/endpoints", user="admin").text
    assert "paused" in html
    assert "maint" in html
    assert "Resume" in html
    post(client, "/endpoints/resume", data={"csrf": token, "endpoint": "cdr_webhook"})
    assert not cdr_db.execute(
        "SELECT paused FROM cdr_webhook.endpoint_state WHERE endpoint = 'cdr_webhook'"
    ).fetchone()[0]


def test_cross_site_and_tokenless_posts_are_refused(client, cdr_db):
    token = csrf_of(get(client, "/endpoints", user="admin").text)
    data = {"csrf": token, "endpoint": "cdr_webhook"}
    assert post(client, "/endpoints/pause", data=data, origin="https://evil.example").status_code == 403
    assert post(client, "/endpoints/pause", data=data, **{"sec-fetch-site": "cross-site"}).status_code == 403
    assert post(client, "/endpoints/pause", data={"endpoint": "cdr_webhook"}).status_code == 403
    viewer_token = csrf_of(get(client, "/endpoints", user="viewer").text)
    assert post(client, "/endpoints/pause", data=data | {"csrf": viewer_token}).status_code == 403
    assert not cdr_db.execute("SELECT 1 FROM cdr_webhook.endpoint_state WHERE paused").fetchall()
    # The same form from the page's own origin goes through.
    assert post(client, "/endpoints/pause", data=data, origin="http://127.0.0.1:8080").status_code == 303


def test_a_redelivery_of_nothing_says_so(client):
    token = csrf_of(get(client, "/", user="admin").text)
    response = post(client, "/redeliver", data={"csrf": token})
    assert response.status_code == 400
    assert "no delivery selected" in response.text


def test_a_delivery_no_task_owns_is_reported_not_cleared(client, cdr_db, populated):
    cdr_id = populated["by_status"]["queued"][0]
    cdr_db.execute(
        "UPDATE cdr_webhook.delivery SET dag_id = NULL, run_id = NULL, map_index = NULL WHERE cdr_id = %s",
        (cdr_id,),
    )
    token = csrf_of(get(client, "/", user="admin").text)
    response = post(client, "/redeliver", data={"csrf": token, "key": json.dumps([cdr_id, "cdr_webhook"])})
    assert response.status_code == 200
    assert "no task owns it (it waits queued for a run): nothing to clear" in unescape(response.text)
    assert "Cleared" not in response.text


def test_in_chunk_mode_a_delivered_cdr_is_not_cleared_and_the_page_says_what_redelivers_it(
    client, populated, monkeypatch
):
    from cdr_webhook.adapters import load_settings
    from cdr_webhook.web.actions import CHUNK_DELIVERED

    monkeypatch.setenv("AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK", "50")
    load_settings.cache_clear()
    try:
        cdr_id = populated["by_status"]["delivered"][0]
        token = csrf_of(get(client, "/", user="admin").text)
        response = post(
            client, "/redeliver", data={"csrf": token, "key": json.dumps([cdr_id, "cdr_webhook"])}
        )
    finally:
        monkeypatch.delenv("AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK")
        load_settings.cache_clear()
    assert response.status_code == 200
    assert CHUNK_DELIVERED in unescape(response.text)
    assert "Cleared" not in response.text


def test_with_tasks_sized_by_the_run_a_delivered_cdr_of_a_chunk_is_not_cleared(client, cdr_db, populated):
    """The default (cdrs_per_task auto): a task of more than one CDR is a chunk, and the page knows it."""
    from cdr_webhook.web.actions import CHUNK_DELIVERED

    cdr_id, neighbour = populated["by_status"]["delivered"][:2]
    cdr_db.execute(  # the two were sent by one chunk task
        "UPDATE cdr_webhook.delivery SET (run_id, map_index) = (SELECT run_id, map_index FROM "
        "cdr_webhook.delivery WHERE cdr_id = %s) WHERE cdr_id = %s",
        (cdr_id, neighbour),
    )
    token = csrf_of(get(client, "/", user="admin").text)

    response = post(client, "/redeliver", data={"csrf": token, "key": json.dumps([cdr_id, "cdr_webhook"])})

    assert response.status_code == 200
    assert CHUNK_DELIVERED in unescape(response.text)
    assert "Cleared" not in response.text


# -- what a disabled action says -------------------------------------------------------------------


def redeliver_button(html: str) -> str:
    """The detail page's Redeliver button tag, and the hint that follows it."""
    return re.search(r"<button [^>]*>Redeliver</button>\s*<span[^>]*>(.*?)</span>", html, re.S).group(0)


def test_a_skipped_cdrs_redeliver_is_off_and_says_how_to_send_it(client, cdr_db, populated):
    from cdr_webhook.web.actions import SKIPPED

    cdr_id = populated["by_status"]["skipped"][0]
    created = cdr_db.execute(
        "SELECT cdr_created_at FROM cdr_webhook.delivery WHERE cdr_id = %s", (cdr_id,)
    ).fetchone()[0]
    html = unescape(get(client, "/delivery", user="admin", cdr_id=cdr_id, endpoint="cdr_webhook").text)
    action = redeliver_button(html)
    assert "disabled" in action
    assert "this CDR was skipped" in action
    assert "mend the source row" in action
    # The configuration of a run that selects this CDR alone, to paste into the trigger form.
    start = created.astimezone(dt.UTC)
    conf = json.loads(re.search(r'<code class="conf">(.*?)</code>', action).group(1))
    assert conf == {
        "window_start": start.isoformat(),
        "window_end": (start + dt.timedelta(microseconds=1)).isoformat(),
        "policy": "all",
        "client_id": 2,
    }
    assert "same webhook-id" in action
    # Selected on the list, it is reported as not cleared, with the same advice.
    token = csrf_of(get(client, "/", user="admin").text)
    response = post(client, "/redeliver", data={"csrf": token, "key": json.dumps([cdr_id, "cdr_webhook"])})
    assert SKIPPED in unescape(response.text)
    assert "Cleared" not in response.text


def test_a_held_cdr_says_its_endpoint_is_paused_and_links_to_resume_it(client, cdr_db, populated):
    from cdr_webhook.ledger import endpoints

    cdr_id = populated["by_status"]["queued"][0]
    cdr_db.execute(
        "UPDATE cdr_webhook.delivery SET dag_id = NULL, run_id = NULL, map_index = NULL WHERE cdr_id = %s",
        (cdr_id,),
    )
    plain = unescape(get(client, "/delivery", user="admin", cdr_id=cdr_id, endpoint="cdr_webhook").text)
    assert "disabled" in redeliver_button(plain)
    assert "no task holds this CDR yet" in redeliver_button(plain)
    assert "the next run sends it" in redeliver_button(plain)

    reason = "configuration: connection 'cdr_webhook' extra 'leg_types': must be a list of integers, not '1'"
    endpoints.pause(cdr_db, "cdr_webhook", reason=reason, actor=endpoints.AUTOMATIC_ACTOR)
    html = unescape(get(client, "/delivery", user="admin", cdr_id=cdr_id, endpoint="cdr_webhook").text)
    action = redeliver_button(html)
    assert "disabled" in action
    assert f"its endpoint is paused ({reason})" in action
    assert "mend the connection <code>cdr_webhook</code>" in action
    assert '<a href="/cdr-webhook/endpoints#endpoint-cdr_webhook">Resume cdr_webhook</a>' in action
    assert "it waits queued, its endpoint is paused" in html  # the task line, not "for the next run"
    # The link's target: the endpoint's row on the Endpoints page.
    assert '<tr id="endpoint-cdr_webhook">' in get(client, "/endpoints", user="admin").text


def test_a_viewers_disabled_actions_say_why_on_the_page(client, populated):
    cdr_id = populated["by_status"]["delivered"][0]
    action = redeliver_button(get(client, "/delivery", cdr_id=cdr_id, endpoint="cdr_webhook").text)
    assert "disabled" in action
    assert "Redeliver is off: your Airflow role may not do this" in action
    listing = get(client, "/", since=DAY.date().isoformat(), to=DAY.date().isoformat()).text
    off = r"disabled[^>]*>{}</button>\s*<span [^>]*>{}: your Airflow role may not do this"
    assert re.search(off.format("Redeliver selected", "Redeliver is off"), listing)
    assert re.search(off.format("Redeliver this filter's result with a run", "Off"), listing)
    # Completeness: its run buttons, one note for all of them.
    days = {"since": "2026-11-20", "to": "2026-11-22"}
    completeness = get(client, "/completeness", **days).text
    assert "The run buttons are off: your Airflow role may not do this" in completeness
    assert re.search(r'disabled aria-describedby="run-why"[^>]*>retry failed', completeness)
    assert "The run buttons are off" not in get(client, "/completeness", user="admin", **days).text
    # An admin's enabled button keeps its hint.
    admin = get(client, "/delivery", user="admin", cdr_id=cdr_id, endpoint="cdr_webhook")
    enabled = redeliver_button(admin.text)
    assert "disabled" not in enabled
    assert "it is sent again with the same webhook-id" in enabled


def test_an_automatic_pause_is_said_once_and_as_automatic(client, cdr_db, populated, monkeypatch):
    from cdr_webhook.adapters import load_endpoint
    from cdr_webhook.endpoint_config import EndpointConfigError
    from cdr_webhook.ledger import endpoints
    from demo.connections import http_conn

    broken = http_conn("https://hooks.example/42", leg_types="1")
    monkeypatch.setenv("AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_42", broken)
    with pytest.raises(EndpointConfigError) as err:
        load_endpoint("cdr_webhook_client_42")
    endpoints.hold(cdr_db, "cdr_webhook_client_42", [], err.value)
    endpoints.pause(cdr_db, "cdr_webhook", reason="maintenance window", actor="admin (Deliveries page)")

    html = unescape(get(client, "/endpoints", user="admin").text)
    assert html.count(str(err.value)) == 1  # the pause's reason only, not the connection's error again
    assert f'<td class="error-text why">paused automatically: configuration: {err.value}</td>' in html
    assert "<td>automatically</td>" in html
    assert '<td class="error-text why">maintenance window</td>' in html  # a person's pause: their reason
    assert "<td>admin (Deliveries page)</td>" in html
    assert ">cdr_webhook<" not in html.replace("<td>cdr_webhook<", "")  # never "by cdr_webhook"


# -- the commit watcher's health ---------------------------------------------------------------------


def watcher_line(html: str) -> tuple[str, str]:
    """The watcher's line or banner on a page: its kind (hint or banner) and its text, tags removed."""
    found = re.search(r'<(p|div) class="([^"]*)"[^>]*id="watcher"[^>]*>(.*?)</\1>', html, re.S)
    assert found is not None, html
    return found.group(2), " ".join(unescape(re.sub(r"<[^>]+>", "", found.group(3))).split())


def record_watcher(conn, *, seen_ago: str | None, health: str = "watching", error: str | None = None) -> None:
    conn.execute(
        "INSERT INTO cdr_webhook.watch_state (source_relation, seen_at, health, health_since, health_error, "
        "heartbeat_seconds) VALUES ('cdr_webhook_source', now() - %(ago)s::interval, %(health)s, "
        "now() - interval '5 minutes', %(error)s, 5) ON CONFLICT (source_relation) DO UPDATE SET "
        "seen_at = EXCLUDED.seen_at, health = EXCLUDED.health, health_since = EXCLUDED.health_since, "
        "health_error = EXCLUDED.health_error",
        {"ago": seen_ago, "health": health, "error": error},
    )


@pytest.mark.parametrize("path", ["/", "/endpoints"])
def test_both_pages_say_when_the_commit_watcher_cannot_start_runs_and_what_it_costs(client, cdr_db, path):
    # Never seen: no triggerer has ever run the watcher (or it never reached the database).
    kind, text = watcher_line(get(client, path).text)
    assert kind == "banner warn"
    assert "Commit watcher: never seen" in text
    assert "minute schedule only, so about a minute after their commit" in text
    assert "airflow jobs check --job-type TriggererJob" in text

    record_watcher(cdr_db, seen_ago="1 second")
    kind, text = watcher_line(get(client, path).text)
    assert kind == "hint"
    assert re.fullmatch(r"commit watcher: watching, last seen [1-9] s ago", text), text

    record_watcher(cdr_db, seen_ago="10 minutes")  # it stopped reporting: the triggerer, or its database
    kind, text = watcher_line(get(client, path).text)
    assert kind == "banner warn"
    assert "last seen 10 min ago (it reports every 5 s): the triggerer may be down" in text

    record_watcher(cdr_db, seen_ago="2 seconds", health="error", error="OperationalError: <no route>")
    page = get(client, path).text
    kind, text = watcher_line(page)
    assert kind == "banner warn"
    assert "failing for 5 min, retrying with a back-off: OperationalError: <no route>" in text
    assert "&lt;no route&gt;" in page  # the error is text, never markup

    record_watcher(cdr_db, seen_ago="2 seconds", health="source_failing", error="column cost: not numeric")
    kind, text = watcher_line(get(client, path).text)
    assert "the source check fails for 5 min: column cost: not numeric" in text
    assert "no CDR is delivered" in text


def test_a_watcher_switched_off_is_said_on_the_page(client, cdr_db, monkeypatch):
    from cdr_webhook.adapters import load_settings

    record_watcher(cdr_db, seen_ago="1 second")  # a heartbeat from before it was switched off
    monkeypatch.setenv("AIRFLOW__CDR_WEBHOOK__WATCH_INTERVAL_SECONDS", "0")
    load_settings.cache_clear()
    try:
        kind, text = watcher_line(get(client, "/").text)
    finally:
        monkeypatch.delenv("AIRFLOW__CDR_WEBHOOK__WATCH_INTERVAL_SECONDS")
        load_settings.cache_clear()
    assert kind == "banner warn"
    assert "Commit watcher: off (watch_interval_seconds = 0)" in text
    assert "set watch_interval_seconds in [cdr_webhook]" in text
