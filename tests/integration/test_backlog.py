"""A backlog of 50,000 queued CDRs drains run after run: capped per run, oldest first, each once."""

from __future__ import annotations

import datetime as dt
import os
import statistics
import time

from cdr_webhook.selection.step import RunInfo, claim_cdrs
from cdr_webhook.settings import Settings
from tests.support.endpoint_configs import configs
from tests.support.source_feed import FEED, create_feed

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
BACKLOG = 50_000
CAP = 500  # max_cdrs_per_run; below Airflow's max_map_length (1024), which settings enforce
SETTINGS = Settings(
    source_relation=FEED,
    cdrs_per_task=1,  # a task per CDR: the cap is the runs' only limit
    max_cdrs_per_run=CAP,
    start_from=T0 - dt.timedelta(hours=6),
    reconcile_hours=0,
)
CONNECTIONS = configs({"cdr_webhook": {}, "cdr_webhook_client_7": {}})


def scheduled(n: int) -> RunInfo:
    return RunInfo("cdr_webhook", f"scheduled__{n}", "scheduled", T0 + (n - 1) * MINUTE, T0 + n * MINUTE, {})


def test_a_50k_backlog_drains_oldest_first_each_cdr_once_never_above_the_cap(cdr_db):
    fill_feed(cdr_db, BACKLOG)
    sent: list[str] = []
    seconds: list[float] = []
    last = {"cdr_webhook": "", "cdr_webhook_client_7": ""}
    run = 0
    while len(sent) < BACKLOG:
        run += 1
        assert run <= BACKLOG // CAP + 1, f"not drained after {run - 1} runs: {len(sent)} sent"
        started = time.perf_counter()
        mapped = claim_cdrs(cdr_db, scheduled(run), SETTINGS, now=T0 + run * MINUTE, connections=CONNECTIONS)
        seconds.append(time.perf_counter() - started)
        assert 0 < len(mapped) <= CAP
        ids = [cdr_id for item in mapped for cdr_id in item["cdr_ids"]]
        for endpoint in last:  # ids sort as the CDRs were created: oldest first, within and across runs
            theirs = [c for item in mapped if item["http_conn_id"] == endpoint for c in item["cdr_ids"]]
            assert theirs == sorted(theirs)
            assert not theirs or theirs[0] > last[endpoint]
            last[endpoint] = theirs[-1] if theirs else last[endpoint]
        # Their tasks deliver them.
        cdr_db.execute(
            "UPDATE cdr_webhook.delivery SET status = 'delivered', delivered_at = now() "
            "WHERE cdr_id = ANY(%s)",
            (ids,),
        )
        sent.extend(ids)

    assert len(sent) == len(set(sent)) == BACKLOG  # each CDR once, none lost
    assert run == BACKLOG // CAP
    queued = cdr_db.execute(
        "SELECT count(*) FROM cdr_webhook.delivery WHERE status <> 'delivered'"
    ).fetchone()
    assert queued[0] == 0
    print(
        f"{BACKLOG} CDRs drained in {run} runs of at most {CAP}; select step p50 "
        f"{statistics.median(seconds) * 1000:.0f} ms, max {max(seconds) * 1000:.0f} ms"
    )


#: CDRs of the chunk-mode drain; CDR_TEST_CHUNK_BACKLOG=50000 (with -s) measures the full backlog.
CHUNK_BACKLOG = int(os.environ.get("CDR_TEST_CHUNK_BACKLOG", "2000"))
CHUNK = 100


def fill_feed(conn, n: int) -> None:
    """An outage's worth of CDRs for two clients (two endpoints), created over the six hours before T0."""
    create_feed(conn)
    conn.execute(
        f"INSERT INTO {FEED} (client_id, cdr_id, callerid, callrequest_id, call_id, campaign_id, "
        "campaign_name, leg_type, phone_number, list_phonebook_id, list_phonebook_name, gateway, "
        "amd_status, hangup_cause_code, cost, billed_duration, incremental_duration, call_date, created_at) "
        "SELECT CASE WHEN n %% 5 = 0 THEN 7 ELSE 1 END, 'cdr-' || lpad(n::text, 6, '0'), 'x', 'r', 'c', 1, "
        "'n', 1, '+3465', '{1}', '{a}', 'g', 1, 16, 0.1, 1, 1, ts, ts "
        "FROM generate_series(1, %s) AS n, "
        "LATERAL (SELECT %s::timestamptz + make_interval(secs => n * 21600.0 / %s)) AS t(ts)",
        (n, T0 - dt.timedelta(hours=6), n),
    )


def test_a_backlog_drains_in_chunks_after_an_outage_oldest_first_each_cdr_once(cdr_db, settings_env):
    """Chunk mode end to end below Airflow: select steps, then every chunk task of each run, for real."""
    from cdr_webhook.deliver.operator import CdrWebhookOperator
    from cdr_webhook.ledger import endpoints, schema
    from demo.connections import http_conn
    from demo.receiver import Receiver
    from tests.support.task_instances import FakeTaskInstance

    cap = 6 * CHUNK if CHUNK_BACKLOG <= 5000 else 50 * CHUNK  # max_cdrs_per_run
    settings = Settings(
        source_relation=FEED,
        max_cdrs_per_run=cap,
        cdrs_per_task=CHUNK,
        start_from=T0 - dt.timedelta(hours=6),
        reconcile_hours=0,
    )
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__SOURCE_RELATION", FEED)
    fill_feed(cdr_db, CHUNK_BACKLOG)
    schema.migrate(cdr_db)
    # Client 7's endpoint was down for hours: it was paused, and its CDRs waited in the queue.
    endpoints.pause(cdr_db, "cdr_webhook_client_7", reason="down", actor="test")
    received: list[str] = []
    with Receiver() as receiver:
        for conn_id in CONNECTIONS_OF_DRAIN:
            settings_env.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", http_conn(receiver.url))
        last = dict.fromkeys(CONNECTIONS_OF_DRAIN, "")
        run, started = 0, time.perf_counter()
        while len(received) < CHUNK_BACKLOG:
            run += 1
            assert run <= 2 * CHUNK_BACKLOG // cap + 2, f"not drained after {run - 1} runs"
            if run == 2:
                endpoints.resume(cdr_db, "cdr_webhook_client_7", actor="test")  # it is back
            chunks = claim_cdrs(
                cdr_db,
                scheduled(run),
                settings,
                now=T0 + run * MINUTE,
                connections=CONNECTIONS,
                cdrs_per_task=CHUNK,
                max_tasks=1023,
            )
            assert 0 < sum(len(c["cdr_ids"]) for c in chunks) <= cap
            for index, chunk in enumerate(chunks):
                ids = chunk["cdr_ids"]
                assert 0 < len(ids) <= CHUNK
                assert ids == sorted(ids)  # oldest first within the chunk, and after the chunk before it
                assert ids[0] > last[chunk["http_conn_id"]]
                last[chunk["http_conn_id"]] = ids[-1]
                operator = CdrWebhookOperator(
                    task_id="post_cdr",
                    cdr_ids=ids,
                    http_conn_id=chunk["http_conn_id"],
                    cdrs_per_task=CHUNK,
                    retries=2,
                )
                operator.execute({"ti": FakeTaskInstance(run_id=f"scheduled__{run}", map_index=index)})
            if run == 1:
                assert {c["http_conn_id"] for c in chunks} == {"cdr_webhook"}  # the paused one waits
            received = [r.cdr_id for r in receiver.received()]
        seconds = time.perf_counter() - started

    assert len(received) == len(set(received)) == CHUNK_BACKLOG  # each CDR once, none lost
    left = cdr_db.execute("SELECT count(*) FROM cdr_webhook.delivery WHERE status <> 'delivered'").fetchone()
    assert left[0] == 0
    print(
        f"{CHUNK_BACKLOG} CDRs drained in chunk mode ({CHUNK} per task, {cap} per run) in {run} runs, "
        f"{seconds:.1f} s: {CHUNK_BACKLOG / seconds:.0f} CDR/s (select steps and chunk tasks in one process)"
    )


CONNECTIONS_OF_DRAIN = ("cdr_webhook", "cdr_webhook_client_7")
