"""The per-endpoint in-flight limit holds across connections (as across workers)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from cdr_webhook.deliver.slots import NoSlot, endpoint_slots


def test_no_more_than_limit_posts_in_flight_per_endpoint(cdr_db, cdr_dsn):
    in_flight = {"a": 0, "b": 0}
    peak = {"a": 0, "b": 0}
    lock = threading.Lock()
    ready = threading.Barrier(10)  # all connected before any asks: a slow connect cannot hide the peak

    def post(endpoint: str) -> None:
        with psycopg.connect(cdr_dsn, autocommit=True) as conn:
            ready.wait(timeout=30)
            with endpoint_slots(conn, endpoint, limit=2, wanted=1, wait_seconds=30, poll_seconds=0.02):
                with lock:
                    in_flight[endpoint] += 1
                    peak[endpoint] = max(peak[endpoint], in_flight[endpoint])
                time.sleep(0.2)
                with lock:
                    in_flight[endpoint] -= 1

    threads = [threading.Thread(target=post, args=(endpoint,)) for endpoint in ("a", "b") * 5]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert peak == {"a": 2, "b": 2}  # the limit is reached, never passed, and per endpoint


def test_a_busy_endpoint_gives_up_after_the_wait_naming_the_setting(cdr_db, cdr_dsn):
    with psycopg.connect(cdr_dsn, autocommit=True) as other:
        with endpoint_slots(other, "busy", limit=1, wanted=1, wait_seconds=1):
            with pytest.raises(
                NoSlot, match="all 1 in-flight slots of endpoint 'busy' stayed busy for 0.3 s"
            ):
                with endpoint_slots(cdr_db, "busy", limit=1, wanted=1, wait_seconds=0.3):
                    pass
    # released: free again
    with endpoint_slots(cdr_db, "busy", limit=1, wanted=1, wait_seconds=0.3) as held:
        assert held.slots == [0]


def test_a_dead_workers_slot_is_freed(cdr_db, cdr_dsn):
    dead = psycopg.connect(cdr_dsn, autocommit=True)
    dead_workers = endpoint_slots(dead, "x", limit=1, wanted=1, wait_seconds=1)
    dead_workers.__enter__()
    dead.close()  # the worker's connection dies with it: PostgreSQL drops its advisory locks
    time.sleep(0.2)
    with endpoint_slots(cdr_db, "x", limit=1, wanted=1, wait_seconds=2) as held:
        assert held.slots == [0]
    dead_workers.__exit__(None, None, None)  # the dead worker's unlock finds nothing to do, and says nothing
