"""An endpoint's rate limit on real PostgreSQL and a real receiver: shared by every sender, never exceeded.

Several senders at once (threads, each with its own database connection, as tasks on several
workers have) draw send times from the endpoint's one row in ``cdr_webhook.endpoint_pace``; the
receiver's arrival times are checked in every sliding one-second window.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import time

import psycopg
import pytest
import requests
from airflow.sdk.exceptions import AirflowRescheduleException

from cdr_webhook import pacing
from cdr_webhook.adapters import load_settings
from cdr_webhook.deliver.operator import CdrWebhookOperator, RetryLater
from cdr_webhook.deliver.rate import Pacer, wait_until
from cdr_webhook.ledger import rates
from demo.receiver import Receiver
from tests.support.task_instances import API_KEY, ENDPOINT, SECRET, FakeTaskInstance, connect_endpoint, row

NOW = dt.datetime.now(dt.UTC)


def arrivals(receiver: Receiver) -> list[float]:
    return [r.at for r in receiver.received()]


def drain_rate(times: list[float]) -> float:
    return (len(times) - 1) / (max(times) - min(times))


def test_reservations_of_concurrent_senders_never_overlap(db, cdr_dsn):
    # 6 connections reserve batches at once: the row lock orders them, so on the database's clock all
    # 120 send times are distinct and at least one spacing apart.
    spacing = pacing.spacing(20)

    def reserve_many() -> list[float]:
        with psycopg.connect(cdr_dsn, autocommit=True) as conn:
            out = []
            for _ in range(5):
                reserved = rates.reserve(conn, ENDPOINT, wanted=4, spacing=spacing, within=60)
                # Absolute times on the database's clock: the offsets are from the row's reading.
                out += [reserved.read_at + offset for offset in reserved.offsets]
            return out

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        times = sorted(t for batch in pool.map(lambda _: reserve_many(), range(6)) for t in batch)
    assert len(times) == 120
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) > spacing - 1e-5, min(gaps)  # next_at is kept to the microsecond
    assert times[-1] - times[0] == pytest.approx(119 * spacing, abs=0.05)


def test_nothing_is_reserved_beyond_the_window_and_a_hold_moves_every_sender_back(db):
    spacing = pacing.spacing(2)  # 0.55 s
    assert (
        len(rates.reserve(db, ENDPOINT, wanted=10, spacing=spacing, within=1.2).offsets) == 3
    )  # 0, .55, 1.1
    assert (
        rates.reserve(db, ENDPOINT, wanted=10, spacing=spacing, within=0.2).offsets == []
    )  # next is 1.65 s off
    rates.hold(db, ENDPOINT, 30)
    [first] = rates.reserve(db, ENDPOINT, wanted=1, spacing=spacing, within=60).offsets
    assert 29 < first <= 30


def test_concurrent_senders_stay_within_the_limit_in_every_sliding_second_and_drain_at_about_it(db, cdr_dsn):
    rate, senders, each = 20, 4, 30
    with Receiver(secret=SECRET, api_key=API_KEY) as receiver:

        def sender() -> None:
            with psycopg.connect(cdr_dsn, autocommit=True) as conn, requests.Session() as session:
                pacer = Pacer(conn, ENDPOINT, rate, ends=None)
                sent = 0
                while sent < each:
                    at = pacer.next_time(each - sent)
                    assert at is not None
                    if wait_until(at):  # else that time passed: take the next one
                        session.post(receiver.url, data=b"{}", timeout=10)
                        sent += 1

        with concurrent.futures.ThreadPoolExecutor(senders) as pool:
            for future in [pool.submit(sender) for _ in range(senders)]:
                future.result()
        times = arrivals(receiver)
    assert len(times) == senders * each
    most, drained = pacing.most_in_window(times), drain_rate(times)
    print(
        f"{len(times)} POSTs from {senders} senders at {rate}/s: most in one second {most}, {drained:.1f}/s"
    )
    assert most <= rate
    assert drained > rate / (1 + pacing.SLACK_SECONDS) * 0.9


def make_chunk(conn, n: int, run_id: str) -> list[str]:
    from demo.dialer import Dialer
    from tests.support.task_instances import queue

    dialer = Dialer(conn)
    made = [dialer.cdr(created_at=NOW - dt.timedelta(minutes=30, seconds=-i), client_id=7) for i in range(n)]
    for cdr in made:
        queue(conn, cdr, run_id=run_id)
    return made


def run_chunk(cdr_ids: list[str], ti: FakeTaskInstance, **options) -> None:
    CdrWebhookOperator(
        task_id="post_cdr", cdr_ids=cdr_ids, http_conn_id=ENDPOINT, cdrs_per_task=100, retries=2, **options
    ).execute({"ti": ti})


def test_two_chunks_sending_at_once_share_the_endpoints_limit(db, monkeypatch):
    with Receiver(secret=SECRET, api_key=API_KEY) as receiver:
        connect_endpoint(monkeypatch, receiver.url, signing_secret=SECRET, rate_limit_per_second=10)
        first, second = make_chunk(db, 25, "scheduled__1"), make_chunk(db, 25, "scheduled__2")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            done = [
                pool.submit(run_chunk, first, FakeTaskInstance(run_id="scheduled__1")),
                pool.submit(run_chunk, second, FakeTaskInstance(run_id="scheduled__2")),
            ]
            for future in done:
                future.result()  # neither raises: waiting for the rate is no failure
        times = arrivals(receiver)
    assert len(times) == 50
    assert {row(db, cdr)["status"] for cdr in first + second} == {"delivered"}
    most, drained = pacing.most_in_window(times), drain_rate(times)
    print(f"2 chunks of 25 at 10/s: most in one second {most}, {drained:.1f}/s")
    assert most <= 10
    assert drained > 10 / (1 + pacing.SLACK_SECONDS) * 0.85


def test_a_chunk_out_of_time_hands_its_unsent_cdrs_back_to_the_queue_without_failing(db, monkeypatch, capsys):
    with Receiver(secret=SECRET, api_key=API_KEY) as receiver:
        connect_endpoint(monkeypatch, receiver.url, signing_secret=SECRET, rate_limit_per_second=2)
        chunk = make_chunk(db, 6, "scheduled__1")
        # An execution_timeout leaving 1.2 s for POSTs to start (less a POST's deadline and 60 s).
        post_deadline = load_settings().request_timeout_seconds
        run_chunk(chunk, FakeTaskInstance(), execution_timeout=dt.timedelta(seconds=post_deadline + 60 + 1.2))
        got = {r.cdr_id for r in receiver.received()}
    assert len(got) == 3, got  # at 0, 0.55 and 1.1 s
    rows = {cdr: row(db, cdr) for cdr in chunk}
    assert {cdr for cdr, r in rows.items() if r["status"] == "delivered"} == got
    back = [r for cdr, r in rows.items() if cdr not in got]
    assert all(r["status"] == "queued" and r["run_id"] is None for r in back), back  # for the next run
    assert all("rate limit (2/s)" in r["error"] for r in back)
    assert "go back to the queue, unsent and without using a retry" in capsys.readouterr().out


def test_a_task_of_one_cdr_with_no_send_time_in_reach_is_rescheduled_not_retried(db, monkeypatch):
    with Receiver(secret=SECRET, api_key=API_KEY) as receiver:
        connect_endpoint(monkeypatch, receiver.url, signing_secret=SECRET, rate_limit_per_second=1)
        [cdr] = make_chunk(db, 1, "scheduled__1")
        rates.hold(db, ENDPOINT, 600)  # the endpoint's next send times are all far off
        with pytest.raises(AirflowRescheduleException):
            CdrWebhookOperator(task_id="post_cdr", cdr_ids=[cdr], http_conn_id=ENDPOINT).execute(
                {"ti": FakeTaskInstance()}
            )
        assert receiver.received() == []
    assert row(db, cdr)["status"] == "queued"


def test_a_retry_after_holds_the_endpoints_next_posts_for_every_sender(db, monkeypatch):
    with Receiver(secret=SECRET, api_key=API_KEY) as receiver:
        connect_endpoint(
            monkeypatch, receiver.url, signing_secret=SECRET, rate_limit_per_second=5, max_in_flight=1
        )
        chunk = make_chunk(db, 3, "scheduled__1")
        receiver.script(chunk[0], [(429, {"Retry-After": "2"})])
        with pytest.raises(RetryLater) as raised:
            run_chunk(chunk, FakeTaskInstance())
        got = {r.cdr_id: r.at for r in receiver.received()}
    assert raised.value.retry_after == 2
    assert set(got) == set(chunk)
    assert got[chunk[1]] - got[chunk[0]] >= 1.95  # held, not the 0.22 s of the pace
    assert got[chunk[2]] - got[chunk[1]] >= pacing.spacing(5) - 0.01
    assert time.time() - got[chunk[0]] < 10


def test_the_endpoints_page_shows_each_endpoints_rate_limit(client, monkeypatch):
    from demo.connections import http_conn
    from tests.support.page import get

    monkeypatch.setenv(
        "AIRFLOW_CONN_CDR_WEBHOOK",
        http_conn("https://hooks.example.com/cdr", api_key=API_KEY, rate_limit_per_second=2.5),
    )
    html = get(client, "/endpoints").text
    assert "<th>rate limit</th>" in html
    assert '<td class="num" data-fact="rate-limit">2.5/s</td>' in html
    monkeypatch.setenv(
        "AIRFLOW_CONN_CDR_WEBHOOK", http_conn("https://hooks.example.com/cdr", api_key=API_KEY)
    )
    assert (
        '<td class="num" data-fact="rate-limit"><span class="hint">none</span></td>'
        in get(client, "/endpoints").text
    )


def test_an_endpoints_own_page_shows_its_limits(client, cdr_db, monkeypatch):
    import re

    from demo.connections import http_conn
    from tests.support.page import get

    monkeypatch.setenv(
        "AIRFLOW_CONN_CDR_WEBHOOK",
        http_conn(
            "https://hooks.example.com/cdr", api_key=API_KEY, rate_limit_per_second=20, max_in_flight=3
        ),
    )
    html = get(client, "/endpoint", endpoint="cdr_webhook").text
    facts = dict(re.findall(r'data-fact="([a-z-]+)">([^<]+)<', html))
    assert (facts["in-flight-limit"], facts["rate-limit"]) == ("3", "20/s")


def test_the_setting_limits_an_endpoint_without_its_own_extra(db, monkeypatch):
    from tests.conftest import reread_settings

    monkeypatch.setenv("AIRFLOW__CDR_WEBHOOK__RATE_LIMIT_PER_SECOND", "4")
    reread_settings()
    try:
        with Receiver(secret=SECRET, api_key=API_KEY) as receiver:
            connect_endpoint(monkeypatch, receiver.url, signing_secret=SECRET)
            chunk = make_chunk(db, 6, "scheduled__1")
            run_chunk(chunk, FakeTaskInstance())
            times = sorted(arrivals(receiver))
    finally:
        monkeypatch.delenv("AIRFLOW__CDR_WEBHOOK__RATE_LIMIT_PER_SECOND")
        reread_settings()
    assert len(times) == 6
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) > pacing.spacing(4) - 0.02, gaps  # 0.275 s apart, not all at once


def test_a_slow_reply_to_one_sender_does_not_move_its_send_times_onto_the_next_senders(
    db, cdr_dsn, monkeypatch
):
    # The reply to one worker's reservation comes late (its commit waited for the disk, its process
    # for a core): its send times must still be read on the database's clock, not from the moment
    # the reply came, or they land on the times the next worker reserved after them.
    spacing = pacing.spacing(20)
    real = rates.reserve

    def late_reply(*args, **kwargs):
        reserved = real(*args, **kwargs)
        time.sleep(0.15)
        return reserved

    with psycopg.connect(cdr_dsn, autocommit=True) as a, psycopg.connect(cdr_dsn, autocommit=True) as b:
        slow, quick = Pacer(a, ENDPOINT, 20, ends=None), Pacer(b, ENDPOINT, 20, ends=None)
        with monkeypatch.context() as patch:
            patch.setattr(rates, "reserve", late_reply)
            slow_times = [slow.next_time(4), *slow.times]
        quick_times = [quick.next_time(4), *quick.times]
    assert len(slow_times) == len(quick_times) == pacing.batch(20)
    times = sorted(slow_times + quick_times)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) > spacing - 0.01, (slow_times, quick_times)
