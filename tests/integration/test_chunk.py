"""CdrWebhookOperator.execute in chunk mode against real PostgreSQL and real receivers, one try at a time.

Each test plays tries of one mapped chunk task (run, map index, try number and max_tries as Airflow
hands them) and checks the ledger, the endpoint's state, what the receiver got and how the try ends.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import http.server
import json
import threading
import time

import psycopg
import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from cdr_webhook.adapters import load_settings
from cdr_webhook.deliver.operator import CdrWebhookOperator, RetryLater
from cdr_webhook.deliver.slots import endpoint_slots
from cdr_webhook.settings import AUTO_SIZED
from cdr_webhook.signing import webhook_id
from demo.dialer import Dialer
from demo.receiver import Receiver
from tests.support.task_instances import (
    API_KEY,
    ENDPOINT,
    SECRET,
    FakeTaskInstance,
    connect_endpoint,
    endpoint_state,
    queue,
    row,
)

NOW = dt.datetime.now(dt.UTC)
#: The DAG's cdrs_per_task in these tests: every chunk below fits.
CHUNK_SIZE = 100


@pytest.fixture
def receiver(monkeypatch):
    with Receiver(secret=SECRET, api_key=API_KEY) as server:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET)
        yield server


def cdrs(conn, n: int) -> list[str]:
    """``n`` queued CDRs of client 7, claimed by run scheduled__1, oldest first."""
    dialer = Dialer(conn)
    made = [
        dialer.cdr(created_at=NOW - dt.timedelta(minutes=30) + dt.timedelta(seconds=i), client_id=7)
        for i in range(n)
    ]
    for cdr in made:
        queue(conn, cdr)
    return made


def run_chunk(
    cdr_ids: list[str], ti: FakeTaskInstance, *, retries: int = 2, cdrs_per_task: int = CHUNK_SIZE
) -> None:
    operator = CdrWebhookOperator(
        task_id="post_cdr",
        cdr_ids=cdr_ids,
        http_conn_id=ENDPOINT,
        cdrs_per_task=cdrs_per_task,
        retries=retries,
    )
    operator.execute({"ti": ti})


def statuses(conn, cdr_ids: list[str]) -> dict[str, tuple[str, int]]:
    return {cdr: (row(conn, cdr)["status"], row(conn, cdr)["attempts"]) for cdr in cdr_ids}


def test_a_chunk_delivers_every_cdr_each_its_own_signed_post_with_its_own_webhook_id(db, receiver, capsys):
    chunk = cdrs(db, 6)

    run_chunk(chunk, FakeTaskInstance())

    assert statuses(db, chunk) == {cdr: ("delivered", 1) for cdr in chunk}
    got = receiver.received()
    assert sorted(r.cdr_id for r in got) == sorted(chunk)
    assert all(r.signature_ok for r in got)
    assert {r.cdr_id: r.headers["webhook-id"] for r in got} == {
        cdr: webhook_id(cdr, ENDPOINT) for cdr in chunk
    }
    assert endpoint_state(db)["failed_attempts"] == 0
    lines = capsys.readouterr().out.splitlines()  # the task's log
    for cdr in chunk:  # one line per CDR: its outcome, HTTP status, latency and webhook-id
        assert any(
            f"CDR {cdr} delivered to {ENDPOINT}: HTTP 200 in" in line and webhook_id(cdr, ENDPOINT) in line
            for line in lines
        )
    assert any("Chunk of 6 CDR(s)" in line and "6 delivered" in line for line in lines)


#: A chunk of the DAG's fixed size, and one the run sized (``cdrs_per_task`` auto): the same rules.
SHAPES = pytest.mark.parametrize("shape", [CHUNK_SIZE, AUTO_SIZED], ids=["fixed", "auto"])


@SHAPES
def test_a_refused_cdr_fails_alone_a_retryable_one_is_the_only_one_sent_again(db, receiver, shape):
    chunk = cdrs(db, 5)
    refused, flaky = chunk[1], chunk[3]
    receiver.script(refused, [400])
    receiver.script(flaky, [(503, {"Retry-After": "3"})])

    with pytest.raises(RetryLater, match=f"1 CDR\\(s\\) of this chunk to retry \\({flaky}\\)") as raised:
        run_chunk(chunk, FakeTaskInstance(try_number=1, max_tries=2), cdrs_per_task=shape)
    assert raised.value.retry_after == 3
    assert statuses(db, chunk) == {
        **{cdr: ("delivered", 1) for cdr in chunk},
        refused: ("failed", 1),
        flaky: ("queued", 1),  # waits for the retry
    }

    # The retry sends only the queued CDR; the task then fails, naming the one that failed for good.
    with pytest.raises(AirflowFailException, match=f"1 CDR\\(s\\) of this chunk failed for good: {refused}"):
        run_chunk(chunk, FakeTaskInstance(try_number=2, max_tries=2), cdrs_per_task=shape)
    assert statuses(db, chunk) == {
        **{cdr: ("delivered", 1) for cdr in chunk},
        refused: ("failed", 1),
        flaky: ("delivered", 2),
    }
    sent = [r.cdr_id for r in receiver.received()]
    assert sorted(sent) == sorted([*chunk, flaky])
    # Every POST of a CDR carries its one webhook-id, on the retry too.
    assert {r.headers["webhook-id"] for r in receiver.received(flaky)} == {webhook_id(flaky, ENDPOINT)}
    # One failed delivery counts in the endpoint's streak, after the deliveries of its neighbours.
    assert endpoint_state(db)["consecutive_failures"] == 0


@SHAPES
def test_clearing_a_chunk_sends_again_only_its_cdrs_not_delivered(db, receiver, shape):
    chunk = cdrs(db, 4)
    refused = chunk[2]
    receiver.script(refused, [400])
    with pytest.raises(AirflowFailException):
        run_chunk(chunk, FakeTaskInstance(try_number=1, max_tries=2), cdrs_per_task=shape)

    # The receiver is fixed; the operator clears the task: Airflow sets max_tries = try_number + retries.
    run_chunk(chunk, FakeTaskInstance(try_number=2, max_tries=1 + 2), cdrs_per_task=shape)

    assert statuses(db, chunk) == {**{cdr: ("delivered", 1) for cdr in chunk}, refused: ("delivered", 2)}
    assert sorted(r.cdr_id for r in receiver.received()) == sorted([*chunk, refused])


def test_retries_exhausted_fail_the_chunk_naming_the_cdr(db, receiver):
    chunk = cdrs(db, 3)
    receiver.script(chunk[0], [503, 503])
    with pytest.raises(RetryLater):
        run_chunk(chunk, FakeTaskInstance(try_number=1, max_tries=1), retries=1)
    with pytest.raises(AirflowFailException, match=f"failed for good: {chunk[0]}"):
        run_chunk(chunk, FakeTaskInstance(try_number=2, max_tries=1), retries=1)
    assert statuses(db, chunk) == {**{cdr: ("delivered", 1) for cdr in chunk}, chunk[0]: ("failed", 2)}
    assert len(receiver.received()) == 4


class Concurrency:
    """A receiver's ``before_answer`` that holds each request ``seconds`` and records how many were in
    flight as each arrived; ``on_arrival(n)`` runs as the n-th arrives."""

    def __init__(self, seconds: float, on_arrival=None) -> None:
        self.seconds = seconds
        self.on_arrival = on_arrival
        self.in_flight = 0
        self.seen: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, headers, body) -> None:
        with self._lock:
            self.in_flight += 1
            self.seen.append(self.in_flight)
            if self.on_arrival is not None:
                self.on_arrival(len(self.seen))
        time.sleep(self.seconds)
        with self._lock:
            self.in_flight -= 1


def test_a_chunk_never_passes_the_endpoints_in_flight_limit_shared_with_other_tasks(db, cdr_dsn, monkeypatch):
    slow = Concurrency(0.15)
    with Receiver(secret=SECRET, api_key=API_KEY, before_answer=slow) as server:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET, max_in_flight=4)
        chunk = cdrs(db, 12)
        # Another task (a worker of its own) holds one of the endpoint's 4 slots the whole time.
        with psycopg.connect(cdr_dsn, autocommit=True) as other_worker:
            with endpoint_slots(other_worker, ENDPOINT, limit=4, wanted=1, wait_seconds=0):
                started = time.monotonic()
                run_chunk(chunk, FakeTaskInstance())
                elapsed = time.monotonic() - started

    assert max(slow.seen) == 3  # concurrent, up to the slots left, never more
    assert statuses(db, chunk) == {cdr: ("delivered", 1) for cdr in chunk}
    assert elapsed < 12 * 0.15  # not one after the other


def test_a_slot_goes_on_to_its_lanes_next_cdr_without_waiting_for_the_calling_thread(db, monkeypatch):
    """A sending thread whose POST was delivered takes its lane's next CDR itself: with the calling
    thread slowed to 0.5 s a turn, one slot's 10 POSTs still go out back to back."""
    from cdr_webhook.deliver.lanes import LaneSender

    collect = LaneSender.collect

    def slow_collect(self):
        time.sleep(0.5)  # the calling thread busy (a long log line, a slow ledger query, ...)
        collect(self)

    monkeypatch.setattr(LaneSender, "collect", slow_collect)
    with Receiver(secret=SECRET, api_key=API_KEY) as server:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET, max_in_flight=1)
        chunk = cdrs(db, 10)
        run_chunk(chunk, FakeTaskInstance())
        arrivals = [post.at for post in server.received()]

    assert statuses(db, chunk) == {cdr: ("delivered", 1) for cdr in chunk}
    # A slot handed back to the calling thread after each POST would take 9 x 0.5 s.
    assert arrivals[-1] - arrivals[0] < 0.5


def test_the_ledger_is_written_in_batches_not_per_cdr(db, receiver):
    """Statement-level triggers count the UPDATE statements on the ledger and the endpoint's state."""
    from cdr_webhook.deliver.recorder import RECORD_GAP_SECONDS

    db.execute("CREATE TABLE public.statement_count (tbl text, op text)")
    db.execute(
        "CREATE FUNCTION public.count_statement() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO public.statement_count VALUES (TG_TABLE_NAME, TG_OP); RETURN NULL; END $$"
    )
    for table in ("delivery", "endpoint_state"):
        db.execute(
            f"CREATE TRIGGER count_statements AFTER INSERT OR UPDATE ON cdr_webhook.{table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION public.count_statement()"
        )
    chunk = cdrs(db, 30)
    db.execute("TRUNCATE public.statement_count")

    started = time.monotonic()
    run_chunk(chunk, FakeTaskInstance())
    elapsed = time.monotonic() - started

    counts = dict(
        db.execute("SELECT tbl || ' ' || op, count(*) FROM public.statement_count GROUP BY 1").fetchall()
    )
    # Each write of outcomes is one endpoint upsert, at most one per RECORD_GAP_SECONDS: a local
    # receiver answers faster than that, so the 30 outcomes are written in batches.
    writes = counts["endpoint_state INSERT"]
    assert writes <= elapsed / RECORD_GAP_SECONDS + 1
    assert writes < len(chunk)
    # Start the attempts, refresh the run's other claims, then one UPDATE per write.
    assert counts["delivery UPDATE"] <= 2 + writes
    assert statuses(db, chunk) == {cdr: ("delivered", 1) for cdr in chunk}


class LedgerProbe:
    """A receiver's ``before_answer`` that, as the ``at``-th POST arrives, looks (on a connection of its
    own) for how many of ``cdr_ids`` the ledger has delivered, up to ``seconds``; then runs ``then``."""

    def __init__(self, dsn: str, cdr_ids: list[str], *, at: int, seconds: float, then=None) -> None:
        self.dsn = dsn
        self.cdr_ids = cdr_ids
        self.at = at
        self.seconds = seconds
        self.then = then
        self.arrived = 0
        self.delivered: int | None = None
        self.waited: float | None = None

    def __call__(self, headers, body) -> None:
        self.arrived += 1
        if self.arrived != self.at:
            return
        started = time.monotonic()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while True:
                [self.delivered] = conn.execute(
                    "SELECT count(*) FROM cdr_webhook.delivery "
                    "WHERE cdr_id = ANY(%s) AND status = 'delivered'",
                    (self.cdr_ids,),
                ).fetchone()
                self.waited = time.monotonic() - started
                if self.delivered >= self.at - 1 or self.waited >= self.seconds:
                    break
                time.sleep(0.01)
            if self.then is not None:
                self.then(conn)


def test_a_2xx_is_in_the_ledger_while_the_chunk_still_sends_its_other_cdrs(db, cdr_dsn, monkeypatch):
    # One POST at a time: as the third arrives, the first two were answered 2xx. Their outcomes are in
    # the ledger within moments, not at the chunk's end or a batch's: a try killed now sends them
    # again on its next try only if they were not (the receiver deduplicates by webhook-id).
    chunk = cdrs(db, 5)
    probe = LedgerProbe(cdr_dsn, chunk, at=3, seconds=1.5)
    with Receiver(secret=SECRET, api_key=API_KEY, before_answer=probe) as server:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET, max_in_flight=1)
        run_chunk(chunk, FakeTaskInstance())
    assert probe.delivered == 2
    assert probe.waited is not None
    assert probe.waited < 0.5
    assert statuses(db, chunk) == {cdr: ("delivered", 1) for cdr in chunk}


def cut_off_all_but(test_pid: int):
    """The CDR database goes away for every session but the probe's and the test's: the task's."""

    def cut_off(conn) -> None:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND pid <> %s",
            (test_pid,),
        )

    return cut_off


def test_a_chunk_cut_off_from_the_database_fails_and_its_retry_sends_only_what_was_not_recorded(
    db, cdr_dsn, monkeypatch
):
    chunk = cdrs(db, 5)
    probe = LedgerProbe(cdr_dsn, chunk, at=3, seconds=1.5, then=cut_off_all_but(db.info.backend_pid))
    with Receiver(secret=SECRET, api_key=API_KEY, before_answer=probe) as server:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET, max_in_flight=1)
        with pytest.raises(psycopg.OperationalError):
            run_chunk(chunk, FakeTaskInstance())
        assert probe.delivered == 2
        run_chunk(chunk, FakeTaskInstance(try_number=2))
        received = [r.cdr_id for r in server.received()]

    # Nothing lost; the two recorded before the outage are not sent again, the third (its 2xx came
    # while the database was away) is.
    assert statuses(db, chunk)[chunk[0]] == ("delivered", 1)
    assert {cdr: status for cdr, (status, _) in statuses(db, chunk).items()} == dict.fromkeys(
        chunk, "delivered"
    )
    assert received.count(chunk[0]) == received.count(chunk[1]) == 1
    assert received.count(chunk[2]) == 2
    assert set(received) == set(chunk)


def test_a_chunk_skips_cdrs_another_run_owns_and_sends_the_rest(db, receiver):
    chunk = cdrs(db, 3)
    db.execute(
        "UPDATE cdr_webhook.delivery SET run_id = 'scheduled__2', status = 'delivered' WHERE cdr_id = %s",
        (chunk[0],),
    )
    run_chunk(chunk, FakeTaskInstance())
    assert sorted(r.cdr_id for r in receiver.received()) == sorted(chunk[1:])
    assert row(db, chunk[0])["run_id"] == "scheduled__2"


class _KeepAliveHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1: answers at once, except (when ``drip``) the second request of a connection, whose
    headers it sends a byte at a time."""

    protocol_version = "HTTP/1.1"
    ports: list[int]
    drip = False
    set_cookie = b""

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.served = getattr(self, "served", 0) + 1
        self.ports.append(self.client_address[1])
        self.cookies.append(self.headers.get("cookie"))
        padding = b"x-padding: " + b"." * 40 + b"\r\n"
        reply = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n" + (self.set_cookie or padding) + b"\r\n"
        if self.drip and self.served == 2:
            for byte in reply:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)
            return
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def keep_alive_server(*, drip: bool = False, set_cookie: bytes = b""):
    attributes = {"ports": [], "cookies": [], "drip": drip, "set_cookie": set_cookie}
    handler = type("Handler", (_KeepAliveHandler,), attributes)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    finally:
        server.shutdown()
        server.server_close()


def test_a_chunk_keeps_its_connections_alive(db, monkeypatch):
    with keep_alive_server() as (url, served):
        connect_endpoint(monkeypatch, url, max_in_flight=2)
        chunk = cdrs(db, 20)
        run_chunk(chunk, FakeTaskInstance())
    assert len(served.ports) == 20
    assert len(set(served.ports)) <= 2  # a connection per sending thread, reused from POST to POST


def test_a_receivers_cookie_is_never_sent_back(db, monkeypatch):
    # One CDR's reply must not shape the next CDR's request: a kept-alive session keeps no cookies.
    with keep_alive_server(set_cookie=b"set-cookie: session=abc; Path=/\r\n") as (url, served):
        connect_endpoint(monkeypatch, url, max_in_flight=1)
        run_chunk(cdrs(db, 3), FakeTaskInstance())
    assert len(set(served.ports)) == 1  # one kept-alive connection; each reply set a cookie
    assert served.cookies == [None, None, None]


def test_a_kept_alive_connection_is_still_bound_by_each_posts_deadline(db, monkeypatch, settings_env):
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__REQUEST_TIMEOUT_SECONDS", "1")
    with keep_alive_server(drip=True) as (url, served):
        connect_endpoint(monkeypatch, url, max_in_flight=1)
        chunk = cdrs(db, 2)
        started = time.monotonic()
        with pytest.raises(RetryLater):
            run_chunk(chunk, FakeTaskInstance())
        elapsed = time.monotonic() - started
    assert len(set(served.ports)) == 1  # the second POST went over the first one's connection
    assert statuses(db, chunk) == {chunk[0]: ("delivered", 1), chunk[1]: ("queued", 1)}
    assert "within the 1 s deadline" in row(db, chunk[1])["error"]
    assert elapsed < 3  # the reply's 60 bytes would take 6 s


def test_a_chunk_takes_the_slots_another_task_frees_while_it_sends(db, cdr_dsn, monkeypatch):
    # Another task holds 3 of the endpoint's 4 slots until the chunk's third POST arrives.
    other_worker = psycopg.connect(cdr_dsn, autocommit=True)
    held = endpoint_slots(other_worker, ENDPOINT, limit=4, wanted=3, wait_seconds=0)
    held.__enter__()  # (never left: the connection's end frees them)
    # When the third POST arrives, the other task's connection ends: its slots are free.
    slow = Concurrency(0.1, on_arrival=lambda n: n == 3 and other_worker.close())

    with Receiver(secret=SECRET, api_key=API_KEY, before_answer=slow) as server:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET, max_in_flight=4)
        chunk = cdrs(db, 30)
        run_chunk(chunk, FakeTaskInstance())

    assert slow.seen[:3] == [1, 1, 1]  # one slot to start with
    assert max(slow.seen) == 4  # then the 3 others, once free
    assert statuses(db, chunk) == {cdr: ("delivered", 1) for cdr in chunk}


class PerChunk:
    """A receiver's hook counting each chunk's POSTs in flight (a chunk: a set of cdr_ids)."""

    def __init__(self, seconds: float, chunks: dict[str, list[str]]) -> None:
        self.seconds = seconds
        self.chunk_of = {cdr: name for name, ids in chunks.items() for cdr in ids}
        self.in_flight = dict.fromkeys(chunks, 0)
        self.seen: list[dict[str, int]] = []  # everyone's in flight, at each arrival
        self._lock = threading.Lock()

    def __call__(self, headers, body) -> None:
        name = self.chunk_of[json.loads(body)["cdr_id"]]
        with self._lock:
            self.in_flight[name] += 1
            self.seen.append(dict(self.in_flight))
        time.sleep(self.seconds)
        with self._lock:
            self.in_flight[name] -= 1


def test_chunks_of_one_endpoint_sending_at_once_share_its_in_flight_limit(db, monkeypatch):
    # Two chunk tasks of one endpoint (limit 4) at once: each sends its half, so both task
    # processes work (one holding all 4 slots while the other waited would use one core only).
    cdr_ids = cdrs(db, 72)
    small, big = cdr_ids[:24], cdr_ids[24:]
    slow = PerChunk(0.1, {"small": small, "big": big})
    with Receiver(secret=SECRET, api_key=API_KEY, before_answer=slow) as server:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET, max_in_flight=4)
        with concurrent.futures.ThreadPoolExecutor(2) as tasks:
            sent = [
                tasks.submit(run_chunk, chunk, FakeTaskInstance(map_index=index))
                for index, chunk in enumerate((small, big))
            ]
            for task in sent:
                task.result()

    assert statuses(db, cdr_ids) == {cdr: ("delivered", 1) for cdr in cdr_ids}
    assert max(sum(seen.values()) for seen in slow.seen) <= 4  # the endpoint's limit, always
    # They sent side by side, about 2 each, for the small chunk's whole time (about 24 of its
    # POSTs and 24 of the big one's); a chunk holding the 4 slots while the other waited would
    # overlap with it for a few POSTs only.
    both = [seen for seen in slow.seen if seen["small"] and seen["big"]]
    assert len(both) >= 24, both
    alone = [seen["big"] for seen in slow.seen if not seen["small"]]
    assert max(alone) > 2  # once the small chunk is done, the big one takes its slots


def test_a_410_pauses_the_endpoint_and_the_rest_of_the_chunk_waits_queued(db, monkeypatch):
    with Receiver(secret=SECRET, api_key=API_KEY) as server:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET, max_in_flight=1)
        chunk = cdrs(db, 6)
        server.script(chunk[1], [410])
        with pytest.raises(AirflowFailException, match=f"failed for good: {chunk[1]}"):
            run_chunk(chunk, FakeTaskInstance())
        sent = [r.cdr_id for r in server.received()]

    assert sent == chunk[:2]  # one at a time, oldest first: nothing after the 410
    assert endpoint_state(db)["paused"] is True
    assert statuses(db, chunk) == {
        chunk[0]: ("delivered", 1),
        chunk[1]: ("failed", 1),
        **{cdr: ("queued", 0) for cdr in chunk[2:]},
    }
    assert {row(db, cdr)["run_id"] for cdr in chunk[2:]} == {None}  # unowned: the next run takes them


# -- the rules of a chunk -------------------------------------------------------------------------


def test_a_chunk_of_a_paused_endpoint_gives_its_cdrs_back_to_the_queue_and_skips(db, receiver):
    from cdr_webhook.ledger import endpoints

    chunk = cdrs(db, 3)
    endpoints.pause(db, ENDPOINT, reason="by hand", actor="test")
    with pytest.raises(AirflowSkipException, match=r"the 3 CDR\(s\) of this chunk still to send stay queued"):
        run_chunk(chunk, FakeTaskInstance())
    assert receiver.received() == []
    assert statuses(db, chunk) == {cdr: ("queued", 0) for cdr in chunk}
    assert {row(db, cdr)["run_id"] for cdr in chunk} == {None}


def test_a_cdr_gone_from_the_source_is_skipped_with_its_reason_and_the_chunk_sends_the_rest(
    db, receiver, capsys
):
    # A chunk checks its rows as it builds their bodies (the select step checks only tasks of one
    # CDR): a row it cannot send is skipped as the select step would skip it, not a chunk failure.
    chunk = cdrs(db, 3)
    db.execute("DELETE FROM dialer.cdr WHERE id::text = %s", (chunk[1],))  # gone from the source
    run_chunk(chunk, FakeTaskInstance())
    log = capsys.readouterr().out  # the task's log
    assert f"CDR {chunk[1]} not sent, skipped: " in log
    assert "2 delivered, 0 to retry, 0 failed for good, 1 skipped" in log
    assert "no longer in" in row(db, chunk[1])["error"]
    assert statuses(db, chunk) == {
        chunk[0]: ("delivered", 1),
        chunk[1]: ("skipped", 0),
        chunk[2]: ("delivered", 1),
    }
    assert sorted(r.cdr_id for r in receiver.received()) == sorted([chunk[0], chunk[2]])


def test_a_chunk_applies_its_endpoints_filters_as_it_builds_the_bodies(db, monkeypatch, capsys):
    # The select step leaves a chunk's rows to the chunk: the endpoint's filters are applied at send.
    chunk = cdrs(db, 3)
    db.execute("UPDATE dialer.cdr SET leg_type = 2 WHERE id::text = %s", (chunk[0],))
    with Receiver(secret=SECRET, api_key=API_KEY) as server:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET, leg_types=[1])
        run_chunk(chunk, FakeTaskInstance())
        assert sorted(r.cdr_id for r in server.received()) == sorted(chunk[1:])
    assert statuses(db, chunk) == {
        chunk[0]: ("skipped", 0),
        chunk[1]: ("delivered", 1),
        chunk[2]: ("delivered", 1),
    }
    assert row(db, chunk[0])["error"] == f"filtered out by {ENDPOINT} extra leg_types=[1]: leg_type is 2"
    assert "2 delivered, 0 to retry, 0 failed for good, 1 skipped" in capsys.readouterr().out


def test_a_chunk_of_one_cdr_keeps_the_chunk_rules(db, receiver):
    # The DAG's chunk size makes the task a chunk, not its length: a cleared chunk of one delivered
    # CDR does not send it again (a cleared task of one CDR in the default mode would).
    [cdr] = chunk = cdrs(db, 1)
    run_chunk(chunk, FakeTaskInstance())
    run_chunk(chunk, FakeTaskInstance(try_number=2, max_tries=1 + 2))
    assert len(receiver.received(cdr)) == 1
    assert statuses(db, chunk) == {cdr: ("delivered", 1)}


class FakeSlots:
    """The HeldSlots a lane asks: its slots, the fair share, taking and giving back."""

    def __init__(self, slots: list[int], fair_share: int) -> None:
        self.slots = slots
        self.share = fair_share

    def fair_share(self) -> int:
        return self.share

    def take_more(self, wanted: int) -> None:
        free = (slot for slot in range(16) if slot not in self.slots)
        while len(self.slots) < wanted:
            self.slots.append(next(free))

    def give_back(self, slot: int) -> None:
        self.slots.remove(slot)


def lane_of(held: FakeSlots, claims: int, limit: int = 4):
    from types import SimpleNamespace

    from cdr_webhook.deliver.lane import Lane
    from cdr_webhook.ledger import Claim

    lane = Lane(
        SimpleNamespace(conn_id=ENDPOINT),
        None,
        [Claim(f"c{i}", ENDPOINT, 7, NOW, "queued", 0) for i in range(claims)],
        limit,
    )
    lane.held = held
    lane.share = len(held.slots)
    return lane


def attempt_of(verdict):
    from cdr_webhook.ledger import Claim
    from cdr_webhook.outcome import Attempt, Decision, PostResult

    claim = Claim("c", ENDPOINT, 7, NOW, "queued", 0)
    return Attempt(claim, PostResult(200, None, None, 1, sent_at=0.0), Decision(verdict, "HTTP 503"), "msg")


def test_a_lane_holds_its_fair_share_of_slots_and_no_more_than_it_can_use():
    import collections

    held = FakeSlots([0, 1, 2, 3], fair_share=2)  # another task of the endpoint sends too
    lane = lane_of(held, 10)
    lane.grow(held.fair_share())
    lane.shrink()
    assert len(held.slots) == 2  # its share
    lane.waiting = collections.deque(["cdr"])
    lane.shrink()
    assert len(held.slots) == 1  # one CDR left: one slot
    held.share = 4  # the other task is done
    lane.waiting = collections.deque(["cdr"] * 10)
    assert lane.sharing()
    lane.grow(held.fair_share())
    assert len(held.slots) == 4  # the slots that came free, up to its share


def test_a_lane_stops_after_twice_its_limit_of_posts_to_retry_in_a_row_and_a_delivery_resets_it():
    from cdr_webhook.deliver.lane import STOP_AFTER_LIMITS
    from cdr_webhook.outcome import Verdict

    lane = lane_of(FakeSlots([0], 1), 100, limit=4)
    for _ in range(STOP_AFTER_LIMITS * 4 - 1):
        lane.counted(attempt_of(Verdict.RETRY))
    lane.counted(attempt_of(Verdict.DELIVERED))
    for _ in range(STOP_AFTER_LIMITS * 4 - 1):
        lane.counted(attempt_of(Verdict.RETRY))
    assert lane.stopped is None
    lane.counted(attempt_of(Verdict.RETRY))
    assert lane.stopped == "its last 8 POSTs are to retry (HTTP 503)"


# Tasks the run sized (cdrs_per_task auto): one CDR keeps the one-CDR rules, more are a chunk.


def sized_task(cdr_ids: list[str]) -> CdrWebhookOperator:
    return CdrWebhookOperator(
        task_id="post_cdr", cdr_ids=cdr_ids, http_conn_id=ENDPOINT, cdrs_per_task=AUTO_SIZED, retries=2
    )


def test_a_sized_tasks_timeout_grows_with_its_length(settings_env):
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__REQUEST_TIMEOUT_SECONDS", "5")
    load_settings.cache_clear()
    settings = load_settings()

    assert sized_task(["a"]).execution_timeout == settings.attempt_timeout
    assert sized_task([f"c{i}" for i in range(300)]).execution_timeout == settings.chunk_timeout_for(300)
    assert settings.chunk_timeout_for(300) > settings.chunk_timeout_for(2) > settings.attempt_timeout


def test_a_sized_task_of_one_cdr_keeps_the_one_cdr_rules(db, receiver):
    (cdr,) = cdrs(db, 1)
    sized_task([cdr]).execute({"ti": FakeTaskInstance()})
    # Cleared after its delivery: a task of one CDR sends it again, on purpose, with its webhook-id.
    sized_task([cdr]).execute({"ti": FakeTaskInstance(try_number=2, max_tries=3)})
    assert len(receiver.received(cdr)) == 2
    assert row(db, cdr)["attempts"] == 2
    # Owned by another run: skipped, naming it (a chunk would send the rest instead).
    db.execute(
        "UPDATE cdr_webhook.delivery SET run_id = 'scheduled__9', status = 'queued' WHERE cdr_id = %s", (cdr,)
    )
    with pytest.raises(AirflowSkipException):
        sized_task([cdr]).execute({"ti": FakeTaskInstance(try_number=3, max_tries=3)})


def test_a_sized_chunk_cleared_after_its_delivery_sends_nothing_again(db, receiver):
    chunk = cdrs(db, 5)
    sized_task(chunk).execute({"ti": FakeTaskInstance()})

    sized_task(chunk).execute({"ti": FakeTaskInstance(try_number=2, max_tries=3)})

    assert sorted(r.cdr_id for r in receiver.received()) == sorted(chunk)  # each once
