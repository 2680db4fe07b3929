"""One customer's hanging endpoint, against a real scheduler: the others' CDRs keep their pace.

Client 7's endpoint accepts connections and never answers, so each of its POSTs lasts the whole
deadline and is retried; it has a backlog of CDRs. Client 1's new CDRs must still arrive within one
schedule interval of the pace they had before client 7's backlog appeared.
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from typing import TYPE_CHECKING

import pytest

from demo.connections import http_conn
from demo.dialer import Dialer

if TYPE_CHECKING:
    from demo.receiver import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.scheduler]

INTERVAL = 10  # seconds: the schedule of this deployment
HANGING_CDRS = 30
# CDR_TEST_MAX_ACTIVE_RUNS=1 reproduces the measurement without overlapping runs (see the README).
MAX_ACTIVE_RUNS = os.environ.get("CDR_TEST_MAX_ACTIVE_RUNS", "4")


class SilentEndpoint:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}/hangs"

    def _accept(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                connection, _ = self._server.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            self._held.append(connection)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for connection in self._held:
            connection.close()
        self._server.close()


@pytest.fixture(scope="module")
def deployment(deploy):
    silent = SilentEndpoint()
    with deploy(
        "airflow-isolation",
        {
            # The triggerer runs, the watcher does not: the schedule's isolation, measured per interval.
            "AIRFLOW__CDR_WEBHOOK__WATCH_INTERVAL_SECONDS": "0",
            "AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_7": http_conn(silent.url, api_key="key-7"),
            "AIRFLOW__CDR_WEBHOOK__SCHEDULE": f"{INTERVAL}s",
            "AIRFLOW__CDR_WEBHOOK__LAG_SECONDS": "30",
            "AIRFLOW__CDR_WEBHOOK__MAX_CDRS_PER_RUN": "60",
            "AIRFLOW__CDR_WEBHOOK__REQUEST_TIMEOUT_SECONDS": "2",
            "AIRFLOW__CDR_WEBHOOK__RETRIES": "3",
            "AIRFLOW__CDR_WEBHOOK__RETRY_DELAY_SECONDS": "5",
            "AIRFLOW__CDR_WEBHOOK__MAX_RETRY_DELAY_SECONDS": "10",
            "AIRFLOW__CDR_WEBHOOK__MAX_IN_FLIGHT_PER_ENDPOINT": "2",
            "AIRFLOW__CDR_WEBHOOK__SLOT_WAIT_SECONDS": "1",
            "AIRFLOW__CDR_WEBHOOK__MAX_ACTIVE_POSTS_PER_RUN": "6",
            "AIRFLOW__CDR_WEBHOOK__MAX_ACTIVE_RUNS": MAX_ACTIVE_RUNS,
        },
        silent,
    ) as (stack, receiver):
        yield stack, receiver, silent


def latencies(dialer: Dialer, receiver: Receiver, *, seconds: float, every: float = 4) -> list[float]:
    """Insert a client-1 CDR every ``every`` s for ``seconds`` s; return each one's insert → POST time."""
    inserted: dict[str, float] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        inserted[dialer.cdr(client_id=1)] = time.time()
        time.sleep(every)
    wait_until = time.monotonic() + 6 * INTERVAL
    while time.monotonic() < wait_until:
        arrived = {r.cdr_id: r.at for r in receiver.received() if r.cdr_id in inserted}
        if len(arrived) == len(inserted):
            return [arrived[cdr] - at for cdr, at in inserted.items()]
        time.sleep(0.5)
    missing = len(inserted) - len({r.cdr_id for r in receiver.received() if r.cdr_id in inserted})
    raise AssertionError(
        f"{missing} of client 1's {len(inserted)} CDRs not delivered within {6 * INTERVAL} s"
    )


def test_a_hanging_endpoint_delays_the_others_by_at_most_one_interval(deployment, cdr_conn):
    stack, receiver, silent = deployment
    dialer = Dialer(cdr_conn)
    before = latencies(dialer, receiver, seconds=2 * INTERVAL)

    for _ in range(HANGING_CDRS):
        dialer.cdr(client_id=7)
    during = latencies(dialer, receiver, seconds=6 * INTERVAL)

    print(
        f"max_active_runs={MAX_ACTIVE_RUNS}: client 1 insert → POST, before client 7's backlog: "
        f"median {statistics.median(before):.1f} s, max {max(before):.1f} s; with client 7 hanging: "
        f"median {statistics.median(during):.1f} s, max {max(during):.1f} s "
        f"({silent.accepted} connections to client 7's endpoint)"
    )
    assert silent.accepted >= 4  # client 7's endpoint was really being tried, and hanging
    assert max(during) <= max(before) + INTERVAL + 3
    hanging = cdr_conn.execute(
        "SELECT count(*) FROM cdr_webhook.delivery WHERE endpoint = %s AND status = 'delivered'",
        ("cdr_webhook_client_7",),
    ).fetchone()[0]
    assert hanging == 0
