"""A dialer that keeps committing CDRs while a test runs, and rides out a restart of its database."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import Any

import psycopg

from demo.dialer import Dialer


class DialerWriter(threading.Thread):
    """
    Commit ``total`` CDRs through the reference schema, ``batch`` per transaction, spread evenly over
    ``seconds``; ``committed`` lists the cdr_ids committed so far.

    A batch whose connection is lost is written again on a new connection, unless it turns out to
    have been committed before the loss (its cdr_ids are all there): each CDR is committed once.
    The first batch makes the client, campaign and contact the others reuse. Connections are in
    autocommit mode: each batch is its own ``BEGIN … COMMIT``.
    """

    def __init__(
        self, dsn: str, total: int, seconds: float, *, batch: int = 25, patience: float = 120
    ) -> None:
        super().__init__(name="dialer-writer", daemon=True)
        self.dsn = dsn
        self.total = total
        self.seconds = seconds
        self.batch = batch
        self.patience = patience
        self.committed: list[str] = []
        self.retried_batches = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._write()
        except BaseException as err:  # noqa: BLE001 - reported by the test that joins the thread
            self.error = err

    def _write(self) -> None:
        batches = [
            [str(uuid.uuid4()) for _ in range(min(self.batch, self.total - start))]
            for start in range(0, self.total, self.batch)
        ]
        dialer = Dialer(psycopg.connect(self.dsn, autocommit=True))
        started = time.monotonic()
        try:
            for number, cdr_ids in enumerate(batches):
                pause = started + number * self.seconds / len(batches) - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                self._commit(dialer, cdr_ids)
                self.committed.extend(cdr_ids)
        finally:
            dialer.conn.close()

    def _commit(self, dialer: Dialer, cdr_ids: list[str]) -> None:
        deadline = time.monotonic() + self.patience
        lost = False
        while True:
            try:
                if lost and _count(dialer.conn, cdr_ids) == len(cdr_ids):
                    return  # the commit went through; only its acknowledgement was lost
                with dialer.conn.transaction():
                    for cdr_id in cdr_ids:
                        dialer.cdr(cdr_id=cdr_id)
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                lost = True
                self.retried_batches += 1
                with contextlib.suppress(psycopg.Error):
                    dialer.conn.close()
                time.sleep(0.5)
                with contextlib.suppress(psycopg.OperationalError):
                    dialer.conn = psycopg.connect(self.dsn, autocommit=True)


def _count(conn: psycopg.Connection[Any], cdr_ids: list[str]) -> int:
    row = conn.execute("SELECT count(*) FROM dialer.cdr WHERE id = ANY(%s::uuid[])", (cdr_ids,)).fetchone()
    assert row is not None
    return row[0]
