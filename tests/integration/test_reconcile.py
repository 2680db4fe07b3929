"""The reconciliation scan against a real PostgreSQL: CDRs committed after the lag are still sent."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

import psycopg

from cdr_webhook import ledger, schema
from cdr_webhook.routing import Route
from cdr_webhook.selection import RunInfo, select_cdrs
from cdr_webhook.settings import Settings
from demo.dialer import Dialer
from tests.endpoint_configs import configs
from tests.source_feed import FEED, add_feed_row, create_feed

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
SECOND = dt.timedelta(seconds=1)
SETTINGS = Settings(lag_seconds=60, max_cdrs_per_run=500, reconcile_hours=24, reconcile_interval_seconds=120)
CONNECTIONS = {"cdr_webhook": {}}


def run(conn, n: int, settings: Settings = SETTINGS) -> list[str]:
    """Scheduled run n, over [T0 + (n-1) min, T0 + n min), at the end of its interval."""
    info = RunInfo("cdr_webhook", f"scheduled__{n}", "scheduled", T0 + (n - 1) * MINUTE, T0 + n * MINUTE, {})
    mapped = select_cdrs(conn, info, settings, now=T0 + n * MINUTE, connections=configs(CONNECTIONS))
    return [item["cdr_id"] for item in mapped]


def test_a_cdr_committed_long_after_the_lag_is_queued_by_the_next_reconciliation(cdr_db, cdr_dsn, caplog):
    dialer = Dialer(cdr_db)
    first = dialer.cdr(created_at=T0 + 10 * SECOND)
    with psycopg.connect(cdr_dsn) as late_conn:  # a transaction left open: its CDR is not visible yet
        late = Dialer(late_conn).cdr(client_id=2, created_at=T0 + 20 * SECOND)

        assert run(cdr_db, 1) == [first]
        # Run 2 reconciles (nothing missing yet); run 3 may not (60 s < 120 s); run 4 reconciles
        # again, still without the late CDR; the watermark is far past its created_at + lag.
        assert [run(cdr_db, n) for n in (2, 3, 4)] == [[], [], []]
        late_conn.commit()

    caplog.set_level(logging.INFO, logger="cdr_webhook.selection")
    caplog.clear()  # what runs 1 to 4 logged, if this logger was already at INFO
    assert run(cdr_db, 5) == []  # the last reconciliation was 60 s ago: not yet
    assert "Reconciliation" not in caplog.text
    assert run(cdr_db, 6) == [late]
    assert "Reconciliation of created_at in [2026-11-28T09:00:00+00:00, 2026-11-28T09:04:00+00:00)" in (
        caplog.text
    )
    assert "1 late CDR(s) queued" in caplog.text
    assert run(cdr_db, 7) == []
    assert run(cdr_db, 8) == []  # reconciled again: the CDR is in the ledger, nothing twice


def test_reconciliation_runs_at_most_once_per_interval(cdr_db):
    dialer = Dialer(cdr_db)
    settings = dataclasses.replace(SETTINGS, reconcile_interval_seconds=300)
    assert [run(cdr_db, n, settings) for n in (1, 2)] == [[], []]  # run 2 reconciled, at T0 + 2 min
    for n in (3, 4, 5, 6):
        # A CDR committed after its scan passed, just before each run.
        missed = dialer.cdr(created_at=T0 + (n - 3) * MINUTE + 30 * SECOND)
        assert run(cdr_db, n, settings) == [], f"run {n} reconciled before 300 s had passed"
    assert run(cdr_db, 7, settings) != []  # T0 + 7 min: 300 s after run 2
    assert missed in [row[0] for row in cdr_db.execute("SELECT cdr_id FROM cdr_webhook.delivery")]


def test_reconciliation_never_reaches_before_the_first_scan_and_can_be_disabled(cdr_db):
    dialer = Dialer(cdr_db)
    history = dialer.cdr(created_at=T0 - dt.timedelta(hours=2))  # before the first run: a backfill's job
    assert [run(cdr_db, n) for n in (1, 2, 3, 4)] == [[], [], [], []]
    missed = dialer.cdr(created_at=T0 + 10 * SECOND)  # committed after the scans passed it
    off = dataclasses.replace(SETTINGS, reconcile_hours=0)
    assert [run(cdr_db, n, off) for n in (5, 6, 7)] == [[], [], []]
    assert run(cdr_db, 8) == [missed]
    assert history not in [row[0] for row in cdr_db.execute("SELECT cdr_id FROM cdr_webhook.delivery")]


def test_late_clients_finds_rows_without_a_ledger_row_under_each_kind_of_key(cdr_db):
    # A NULL cdr_id and a too-long one are recorded under keys derived from the row: once recorded,
    # they are not late any more, like a plain cdr_id.
    schema.migrate(cdr_db)
    create_feed(cdr_db)
    for client, cdr_id in ((1, "plain"), (2, None), (3, "x" * (ledger.MAX_CDR_ID_LENGTH + 1))):
        add_feed_row(cdr_db, cdr_id, T0 + client * SECOND, client_id=client)
    span = {"relation": FEED, "start": T0, "end": T0 + MINUTE}

    assert sorted(ledger.late_clients(cdr_db, **span)) == [1, 2, 3]
    ledger.enqueue_new(cdr_db, routes={c: Route("cdr_webhook") for c in (1, 2, 3)}, **span)
    assert ledger.late_clients(cdr_db, **span) == []
    add_feed_row(cdr_db, None, T0 + 4 * SECOND, client_id=4, call_id="another row")
    assert ledger.late_clients(cdr_db, **span) == [4]
