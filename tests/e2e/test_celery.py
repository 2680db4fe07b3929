"""A distributed run: CeleryExecutor, two Celery workers, Redis as broker, PostgreSQL as result backend.

Hundreds of CDRs go out through both workers, each exactly once, and a task's log is readable through
the REST API. Then one worker is killed with SIGKILL (every process of it) in the middle of a run,
one of its POSTs in flight: the scheduler notices the missing heartbeats of its running tasks and
retries them on the other worker (tasks it had taken from the queue but not started would be put back
after ``[scheduler] task_queued_timeout``), the run succeeds, no CDR is lost, and the CDR POSTed twice
carries the same ``webhook-id`` both times.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

import pytest
from psycopg.conninfo import make_conninfo

from cdr_webhook import pacing
from demo.celery_stack import CeleryStack
from demo.dialer import Dialer
from tests.support.deployments import API_KEY, SIGNING_SECRET
from tests.support.secrets_sweep import Sweep, fernet_key_of

if TYPE_CHECKING:
    from demo.receiver import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.scheduler, pytest.mark.celery]

CDRS = 120  # the first run's: a task each, spread over both workers
KILL_CDRS = 120  # the run that loses a worker
WORKERS = ("worker-1", "worker-2")
# A killed worker's running tasks are retried this long after their last heartbeat, and the tasks it
# had taken from the queue but not started are put back this long after they were queued.
HEARTBEAT_TIMEOUT = 15
QUEUED_TIMEOUT = 30


@pytest.fixture(scope="module")
def deployment(deploy, redis_url):
    with deploy(
        "airflow-celery",
        {
            # The triggerer runs, the commit watcher does not: these tests start their runs by hand.
            "AIRFLOW__CDR_WEBHOOK__WATCH_INTERVAL_SECONDS": "0",
            # A task per CDR (not sized by the run): the kill below lands on the POST of one CDR.
            "AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK": "1",
            "AIRFLOW__API__MAXIMUM_PAGE_LIMIT": "1000",  # one page holds a run's task instances
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "2",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(QUEUED_TIMEOUT),
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "5",
            # Each worker takes two tasks ahead from the broker: the killed one takes some with it.
            "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "2",
            "AIRFLOW__CDR_WEBHOOK__RETRIES": "3",
            "AIRFLOW__CDR_WEBHOOK__RETRY_DELAY_SECONDS": "1",
            "AIRFLOW__CDR_WEBHOOK__MAX_RETRY_DELAY_SECONDS": "2",
        },
        stack_class=CeleryStack,
        broker_url=redis_url,
        workers=len(WORKERS),
        concurrency=2,
    ) as (stack, receiver):
        print(f"Celery workers: {', '.join(stack.workers)}")
        yield stack, receiver


def add_cdrs(cdr_conn, count: int, days_ago: int) -> tuple[list[str], dict[str, str]]:
    """Insert ``count`` CDRs ``days_ago`` days back (where no scheduled scan looks); return them, a window."""
    start = (dt.datetime.now(dt.UTC) - dt.timedelta(days=days_ago)).replace(microsecond=0)
    dialer = Dialer(cdr_conn)
    with cdr_conn.transaction():
        cdrs = [dialer.cdr(created_at=start + dt.timedelta(seconds=n)) for n in range(count)]
    window = {"window_start": start.isoformat(), "window_end": (start + dt.timedelta(hours=1)).isoformat()}
    return cdrs, window


def post_cdrs(stack: CeleryStack, run_id: str) -> list[dict]:
    return [ti for ti in stack.task_instances(run_id) if ti["task_id"] == "post_cdr"]


def assert_each_delivered_once(receiver: Receiver, cdr_conn, cdrs: list[str]) -> None:
    received = Counter(r.cdr_id for r in receiver.received() if r.cdr_id in set(cdrs))
    assert received == Counter(cdrs), f"{len(set(cdrs) - set(received))} missing"
    delivered = cdr_conn.execute(
        "SELECT count(*) FROM cdr_webhook.delivery WHERE cdr_id = ANY(%s) AND status = 'delivered'", (cdrs,)
    ).fetchone()[0]
    assert delivered == len(cdrs)


def test_a_run_spreads_over_both_workers_each_cdr_once_and_logs_are_readable(deployment, cdr_conn):
    stack, receiver = deployment
    cdrs, window = add_cdrs(cdr_conn, CDRS, days_ago=2)

    started = time.monotonic()
    run_id = stack.trigger(conf=window)
    state = stack.wait_run(run_id, timeout=240)
    wall = time.monotonic() - started

    tis = post_cdrs(stack, run_id)
    spread = Counter(ti["hostname"] for ti in tis)
    tries = sum(ti["try_number"] for ti in tis)
    print(
        f"{CDRS} CDRs on {len(WORKERS)} Celery workers: run {state} in {wall:.1f} s; "
        f"tasks per worker {dict(spread)}; {tries} tries"
    )
    assert state == "success", stack.dump()
    assert len(tis) == CDRS
    # One try each: concurrent tries of one run never block each other on the ledger (they deadlocked
    # before their claim refresh skipped locked rows).
    assert tries == CDRS
    assert {ti["state"] for ti in tis} == {"success"}
    assert set(spread) == set(WORKERS)
    assert_each_delivered_once(receiver, cdr_conn, cdrs)
    assert all(r.signature_ok for r in receiver.received() if r.cdr_id in set(cdrs))

    for worker in WORKERS:
        ti = next(ti for ti in tis if ti["hostname"] == worker)
        log = stack.task_log(run_id, ti["map_index"], ti["try_number"])
        assert any(f"CDR {ti['rendered_map_index']} delivered to" in line for line in log), log[-20:]
        # The api-server cannot reach a worker by the name "worker-1" for its log: it read the file
        # the worker wrote (one AIRFLOW_HOME here), the only source the log names.
        sources = log[log.index("::group::Log message source details") + 1 : log.index("::endgroup::")]
        assert len(sources) == 1, sources
        assert sources[0].startswith(str(stack.home / "logs")), sources
        assert sources[0].endswith(f"/map_index={ti['map_index']}/attempt={ti['try_number']}.log"), sources


def test_a_worker_killed_mid_run_loses_no_cdr(deployment, cdr_conn):
    stack, receiver = deployment
    cdrs, window = add_cdrs(cdr_conn, KILL_CDRS, days_ago=3)
    victim, survivor = WORKERS[1], WORKERS[0]
    run: dict[str, str] = {}
    armed, caught = threading.Event(), threading.Event()
    lock = threading.Lock()

    def freeze_while_posting(headers: dict[str, str], body: bytes) -> None:
        """Freeze the victim while the receiver holds one of its POSTs: the kill then finds a POST
        the receiver has and the ledger does not."""
        if not armed.is_set():
            return
        with lock:
            if caught.is_set():
                return
            cdr_id = json.loads(body)["cdr_id"]
            ti = next((ti for ti in post_cdrs(stack, run["id"]) if ti["rendered_map_index"] == cdr_id), None)
            if ti is not None and ti["hostname"] == victim:
                stack.freeze_worker(victim)
                run["in_flight"] = cdr_id
                caught.set()

    receiver.before_answer = freeze_while_posting
    try:
        run["id"] = run_id = stack.trigger(conf=window)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            tis = post_cdrs(stack, run_id)
            on_victim = sum(ti["state"] == "running" and ti["hostname"] == victim for ti in tis)
            if on_victim and sum(ti["state"] == "success" for ti in tis) >= KILL_CDRS // 5:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"{victim} never ran tasks: {Counter(ti['state'] for ti in tis)}")
        armed.set()
        assert caught.wait(60), f"no POST from {victim} reached the receiver in 60 s"
        # Frozen, what ran there cannot change while it is looked at; then killed.
        time.sleep(1)
        tis = post_cdrs(stack, run_id)
        running = {ti["map_index"] for ti in tis if ti["state"] == "running" and ti["hostname"] == victim}
        done = sum(ti["state"] == "success" for ti in tis)
        killed_at = time.monotonic()
        killed = stack.kill_worker(victim)
        print(
            f"SIGKILL to {len(killed)} processes of {victim} with {len(running)} of its tasks running "
            f"(one of them in the middle of its POST), {done} of {KILL_CDRS} tasks done"
        )
        assert running, f"no task was running on {victim} when it was killed"

        state = stack.wait_run(run_id, timeout=240)
        settled = time.monotonic() - killed_at
    finally:
        receiver.before_answer = None

    tis = {ti["map_index"]: ti for ti in post_cdrs(stack, run_id)}
    retried = {index for index, ti in tis.items() if ti["try_number"] >= 2}
    timeouts = stack.api("GET", "/eventLogs", params={"event": "heartbeat timeout", "limit": 1000})
    requeued = stack.api("GET", "/eventLogs", params={"event": "stuck in queued reschedule", "limit": 1000})
    requests = [r for r in receiver.received() if r.cdr_id in set(cdrs)]
    twice = {cdr for cdr, n in Counter(r.cdr_id for r in requests).items() if n > 1}
    print(
        f"after the kill the run {state} in {settled:.1f} s: {timeouts['total_entries']} heartbeat "
        f"timeouts, {requeued['total_entries']} tasks put back from the queue, {len(retried)} tasks "
        f"tried again, {len(twice)} CDRs received twice"
    )
    assert state == "success", stack.dump()
    assert {ti["state"] for ti in tis.values()} == {"success"}
    # Every task the kill caught running was failed for its missing heartbeat and tried again, on the
    # other worker.
    assert timeouts["total_entries"] >= len(running)
    assert running <= retried
    assert {tis[index]["hostname"] for index in running} == {survivor}
    webhook_ids: dict[str, set[str]] = defaultdict(set)
    for request in requests:
        webhook_ids[request.cdr_id].add(request.headers["webhook-id"])
    assert set(webhook_ids) == set(cdrs)  # nothing lost
    assert all(len(ids) == 1 for ids in webhook_ids.values())  # sent twice: the same webhook-id
    assert run["in_flight"] in twice  # the POST the kill interrupted was sent again
    assert twice <= {tis[index]["rendered_map_index"] for index in retried}
    delivered = cdr_conn.execute(
        "SELECT count(*) FROM cdr_webhook.delivery WHERE cdr_id = ANY(%s) AND status = 'delivered'", (cdrs,)
    ).fetchone()[0]
    assert delivered == KILL_CDRS


def test_no_secret_in_the_celery_deployments_files_or_metadata(deployment, pg_server):
    """The Celery run's part of the secrets sweep (tests/e2e/test_secrets_sweep.py has the rest), after
    the runs above: the workers' task logs and every component's output, and every table of the
    metadata database, Celery's result backend included."""
    stack, _ = deployment
    sweep = Sweep({"API_KEY": API_KEY, "SIGNING_SECRET": SIGNING_SECRET})
    sweep.files(stack.home, "AIRFLOW_HOME")
    dsn = make_conninfo(pg_server, dbname=stack.meta_db)
    sweep.database(dsn, "metadata", fernet_key_of(stack.home))
    print(f"Celery deployment: searched {dict(sweep.searched)}")
    assert all((stack.home / f"{worker}.log").stat().st_size for worker in WORKERS)
    assert not sweep.findings, sweep.report()


#: The rate-limit run's backlog: 2,000 (the issue's figure, about 110 s at 20/s) with
#: CDR_RATE_E2E_CDRS=2000; CI drains 600 (the same pacing, a third of the time).
RATE_CDRS = int(os.environ.get("CDR_RATE_E2E_CDRS", "600"))
RATE_LIMIT = 20


def test_a_rate_limit_holds_in_every_second_across_chunks_on_both_workers(deployment, cdr_conn):
    """Last in the module: it re-deploys the DAG in chunks of 100 with every endpoint limited to 20/s."""
    stack, receiver = deployment
    task = "/dags/cdr_webhook/tasks/post_cdr"
    per_cdr = stack.api("GET", task)["execution_timeout"]  # a chunk's grows with its CDRs
    stack.env |= {
        "AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK": "100",
        "AIRFLOW__CDR_WEBHOOK__MAX_CDRS_PER_RUN": str(RATE_CDRS),
        "AIRFLOW__CDR_WEBHOOK__RATE_LIMIT_PER_SECOND": str(RATE_LIMIT),
    }
    # The workers first: the worker the kill test killed is not running, and a restart waits for the
    # whole deployment to be healthy. They parse the DAG too, and read the rate limit when a task runs.
    for worker in WORKERS:
        if stack.processes[worker].poll() is None:
            stack.kill_worker(worker)  # idle: no task of the module runs now
        stack.start_worker_again(worker)
    stack.restart("dag-processor")  # the chunk size is read when the DAG is parsed
    deadline = time.monotonic() + 120
    while stack.api("GET", task)["execution_timeout"] == per_cdr:
        assert time.monotonic() < deadline, "the DAG in chunks was not parsed in 120 s"
        time.sleep(1)
    cdrs, window = add_cdrs(cdr_conn, RATE_CDRS, days_ago=4)

    run_id = stack.trigger(conf=window)
    state = stack.wait_run(run_id, timeout=RATE_CDRS / 10 + 180)

    tis = post_cdrs(stack, run_id)
    wanted = set(cdrs)
    times = sorted(r.at for r in receiver.received() if r.cdr_id in wanted)
    most = pacing.most_in_window(times)
    drained = (len(times) - 1) / (times[-1] - times[0])
    spread = Counter(ti["hostname"] for ti in tis)
    print(
        f"{RATE_CDRS} CDRs at {RATE_LIMIT}/s in {len(tis)} chunks on {dict(spread)}: run {state}; most POSTs "
        f"in any sliding second at the receiver {most}; drained at {drained:.1f}/s over "
        f"{times[-1] - times[0]:.1f} s"
    )
    assert state == "success", stack.dump()
    assert len(tis) == -(-RATE_CDRS // 100)  # chunks, not a task per CDR
    assert set(spread) == set(WORKERS)  # chunks on both workers
    assert_each_delivered_once(receiver, cdr_conn, cdrs)
    assert most <= RATE_LIMIT
    assert drained >= 0.75 * RATE_LIMIT  # about the limit: 18.2/s is the pace (docs/endpoints.md)
