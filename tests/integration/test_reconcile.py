"""The reconciliation scan against a real PostgreSQL: CDRs committed after the lag are still sent."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

import psycopg
import pytest

from cdr_webhook import ledger
from cdr_webhook.ledger import schema
from cdr_webhook.routing import Route
from cdr_webhook.selection.step import RunInfo, claim_cdrs
from cdr_webhook.settings import Settings
from demo.dialer import Dialer
from tests.support.endpoint_configs import configs
from tests.support.ledger_schema import columns, install_up_to, versions
from tests.support.source_feed import FEED, add_feed_row, create_feed

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
SECOND = dt.timedelta(seconds=1)
SETTINGS = Settings(lag_seconds=60, max_cdrs_per_run=500, reconcile_hours=24, reconcile_interval_seconds=120)
CONNECTIONS = {"cdr_webhook": {}}


def run(conn, n: int, settings: Settings = SETTINGS) -> list[str]:
    """Scheduled run n, over [T0 + (n-1) min, T0 + n min), at the end of its interval."""
    info = RunInfo("cdr_webhook", f"scheduled__{n}", "scheduled", T0 + (n - 1) * MINUTE, T0 + n * MINUTE, {})
    mapped = claim_cdrs(conn, info, settings, now=T0 + n * MINUTE, connections=configs(CONNECTIONS))
    return [cdr_id for item in mapped for cdr_id in item["cdr_ids"]]


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


def test_a_null_cdr_id_keeps_its_key_whatever_the_sessions_settings_and_a_new_column(cdr_db):
    # The key of a row without a cdr_id is made from the columns that identify it, its times in UTC:
    # not from the row's text, which the session's TimeZone and DateStyle and any new column change.
    schema.migrate(cdr_db)
    create_feed(cdr_db)
    add_feed_row(cdr_db, None, T0 + SECOND, client_id=2)
    span = {"relation": FEED, "start": T0, "end": T0 + MINUTE}
    ledger.enqueue_new(cdr_db, routes={2: Route("cdr_webhook")}, **span)

    cdr_db.execute("SET TimeZone = 'America/New_York'")
    cdr_db.execute("SET DateStyle = 'SQL, DMY'")
    cdr_db.execute(f"ALTER TABLE {FEED} ADD COLUMN note text DEFAULT 'a column added later'")

    assert ledger.late_clients(cdr_db, **span) == []  # the reconciliation finds it recorded
    ledger.enqueue_new(cdr_db, routes={2: Route("cdr_webhook")}, **span)  # and a scan records it once
    rows = cdr_db.execute("SELECT cdr_id, status FROM cdr_webhook.delivery").fetchall()
    assert len(rows) == 1
    assert rows[0][0].startswith(ledger.NULL_CDR_ID_PREFIX)
    assert rows[0][1] == "skipped"


def test_a_cdr_recorded_under_another_created_at_is_not_late(cdr_db):
    # The first stage of the anti-join looks for a ledger row of the row's own created_at; a cdr_id
    # the source has twice is recorded under its earliest row, outside this span: still recorded.
    schema.migrate(cdr_db)
    create_feed(cdr_db)
    add_feed_row(cdr_db, "twice", T0 - MINUTE)
    ledger.enqueue_new(cdr_db, routes={7: Route("cdr_webhook")}, relation=FEED, start=T0 - MINUTE, end=T0)
    add_feed_row(cdr_db, "twice", T0 + SECOND)
    span = {"relation": FEED, "start": T0, "end": T0 + MINUTE}

    assert ledger.late_clients(cdr_db, **span) == []
    assert ledger.enqueue_new(cdr_db, routes={7: Route("other")}, **span) == 0
    assert cdr_db.execute("SELECT endpoint, cdr_created_at FROM cdr_webhook.delivery").fetchall() == [
        ("cdr_webhook", T0 - MINUTE)
    ]


@pytest.fixture
def span(cdr_db):
    """One row of client 7 in the feed, and the minute that holds it."""
    schema.migrate(cdr_db)
    create_feed(cdr_db)
    add_feed_row(cdr_db, "a", T0 + SECOND)
    return {"relation": FEED, "start": T0, "end": T0 + MINUTE}


class SettingRecorder(psycopg.Cursor):
    """Notes the value of ``setting`` each statement on the source relation runs under."""

    setting = "jit"
    seen: list[str]

    def execute(self, query, params=None, **kwargs):
        text = query if isinstance(query, str) else query.as_string(self.connection)
        if "cdr_feed" in text:
            with psycopg.Cursor(self.connection) as cur:
                type(self).seen.append(cur.execute(f"SHOW {self.setting}").fetchone()[0])
        return super().execute(query, params, **kwargs)


def test_the_day_long_reads_run_without_jit_and_leave_the_setting_as_it_was(span, cdr_dsn):
    # A day of CDRs read by index is costed above jit_above_cost yet takes milliseconds: compiling
    # the plan cost more than running it (measured in docs/benchmarks.md).
    SettingRecorder.seen = []
    with psycopg.connect(cdr_dsn, autocommit=True, cursor_factory=SettingRecorder) as conn:
        conn.execute("SET jit = on")
        assert ledger.late_clients(conn, **span) == [7]
        with conn.transaction():
            assert ledger.enqueue_new(conn, routes={7: Route("cdr_webhook")}, **span) == 1
            assert conn.execute("SHOW jit").fetchone() == ("on",)
        assert conn.execute("SHOW jit").fetchone() == ("on",)
        with pytest.raises(psycopg.errors.UndefinedTable), conn.transaction():
            ledger.late_clients(conn, relation="public.no_such_feed", start=T0, end=T0 + MINUTE)
        assert conn.execute("SHOW jit").fetchone() == ("on",)
    assert SettingRecorder.seen == ["off"] * 4  # late_clients; enqueue_new's three statements


SLICED = dataclasses.replace(SETTINGS, reconcile_interval_seconds=60, reconcile_cdrs_per_run=3)


def test_a_sweep_in_slices_queues_a_late_cdr_anywhere_in_the_window_exactly_once(cdr_db, caplog):
    # Three ledger rows a slice, a slice a run: the window is checked over several runs. Late CDRs
    # at its start, middle and end (some behind the cursor when they commit) are each queued once.
    dialer = Dialer(cdr_db)
    on_time = {dialer.cdr(client_id=1 + k % 3, created_at=T0 + k * 10 * SECOND) for k in range(1, 13)}
    sent = [cdr_id for n in range(1, 7) for cdr_id in run(cdr_db, n, SLICED)]
    assert sorted(sent) == sorted(on_time)

    late = {dialer.cdr(client_id=2, created_at=T0 + at * SECOND) for at in (15, 65, 118)}
    caplog.set_level(logging.INFO, logger="cdr_webhook.selection")
    caplog.clear()
    # The window [T0, T0 + (n - 2) min) holds 15 ledger rows at most: a sweep is 5 runs, two sweeps 10.
    sent = [cdr_id for n in range(7, 17) for cdr_id in run(cdr_db, n, SLICED)]
    assert sorted(sent) == sorted(late)
    rows = cdr_db.execute(
        "SELECT cdr_id, count(*) FROM cdr_webhook.delivery WHERE cdr_id = ANY(%s) GROUP BY 1", (list(late),)
    ).fetchall()
    assert sorted(rows) == sorted((cdr_id, 1) for cdr_id in late)
    slices = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Reconciliation of")]
    assert len(slices) == 10  # one slice per run
    assert all("one slice of the window [2026-11-28T09:00:00+00:00" in message for message in slices)


def _ledger_rows_at(conn, *seconds: int) -> None:
    conn.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status) "
        "SELECT 'cdr-' || i, 'cdr_webhook', %s + make_interval(secs => s), 'delivered' "
        "FROM unnest(%s::int[]) WITH ORDINALITY AS t(s, i)",
        (T0, list(seconds)),
    )


def _slices(conn, *, start, before, max_cdrs, count):
    return [
        ledger.reconcile_slice(conn, "src", start=start, before=before, max_cdrs=max_cdrs)
        for _ in range(count)
    ]


def test_reconcile_slices_tile_the_window_and_the_cursor_wraps(cdr_db):
    schema.migrate(cdr_db)
    cdr_db.execute("INSERT INTO cdr_webhook.watermark (source_relation) VALUES ('src')")
    # Ten rows a second apart, and four more at second 5: five rows at one instant.
    _ledger_rows_at(cdr_db, *range(10), 5, 5, 5, 5)
    at = [T0 + s * SECOND for s in range(21)]

    assert _slices(cdr_db, start=T0, before=at[20], max_cdrs=3, count=6) == [
        (at[0], at[3]),
        (at[3], at[5]),  # 3 and 4; the next three rows are all at second 5
        (at[5], at[6]),  # the five rows of second 5, together
        (at[6], at[9]),
        (at[9], at[20]),  # the last row, and the rest of the sweep
        (at[0], at[3]),  # a new sweep
    ]
    cursor = cdr_db.execute("SELECT reconcile_cursor, reconcile_until FROM cdr_webhook.watermark").fetchone()
    assert cursor == (at[3], at[20])


def test_a_sweep_ends_where_it_began_and_skips_what_left_the_window(cdr_db):
    schema.migrate(cdr_db)
    cdr_db.execute("INSERT INTO cdr_webhook.watermark (source_relation) VALUES ('src')")
    _ledger_rows_at(cdr_db, *range(30))
    at = [T0 + s * SECOND for s in range(41)]

    assert _slices(cdr_db, start=at[0], before=at[10], max_cdrs=4, count=1) == [(at[0], at[4])]
    # Later runs scanned further: the sweep still ends at second 10, the next one reaches the new end.
    assert _slices(cdr_db, start=at[0], before=at[20], max_cdrs=4, count=3) == [
        (at[4], at[8]),
        (at[8], at[10]),
        (at[0], at[4]),
    ]
    # The window moved past the cursor: the sweep goes on from the window's start.
    assert _slices(cdr_db, start=at[6], before=at[30], max_cdrs=4, count=2) == [
        (at[6], at[10]),
        (at[10], at[14]),
    ]
    # ... and past the whole sweep: a new one begins at the window's start.
    assert _slices(cdr_db, start=at[25], before=at[40], max_cdrs=4, count=2) == [
        (at[25], at[29]),
        (at[29], at[40]),
    ]
    # An empty window: nothing to check.
    assert _slices(cdr_db, start=at[40], before=at[40], max_cdrs=4, count=1) == [None]


class ParallelRecorder(SettingRecorder):
    setting = "max_parallel_workers_per_gather"


def test_a_reconciliation_slice_is_read_without_parallel_workers(span, cdr_dsn):
    # A slice of 10,000 CDRs took a third longer with parallel workers, and at 20,000 their plan read
    # the view's biggest table whole (docs/benchmarks.md); a window run's enqueue keeps them.
    ParallelRecorder.seen = []
    with psycopg.connect(cdr_dsn, autocommit=True, cursor_factory=ParallelRecorder) as conn:
        conn.execute("SET max_parallel_workers_per_gather = 3")
        assert ledger.late_clients(conn, **span) == [7]
        with conn.transaction(force_rollback=True):
            assert ledger.enqueue_new(conn, routes={7: Route("cdr_webhook")}, parallel=False, **span) == 1
            assert conn.execute("SHOW max_parallel_workers_per_gather").fetchone() == ("3",)
        assert ledger.enqueue_new(conn, routes={7: Route("cdr_webhook")}, **span) == 1
        assert conn.execute("SHOW max_parallel_workers_per_gather").fetchone() == ("3",)
    assert ParallelRecorder.seen == ["0"] * 4 + ["3"] * 3


def test_step_7_upgrades_a_database_at_step_6_and_its_next_reconciliation_starts_a_sweep(cdr_db):
    # As a release at step 6 leaves it after a few scheduled runs: scanned, reconciled, no cursor.
    dialer = Dialer(cdr_db)
    on_time = dialer.cdr(created_at=T0 + 10 * SECOND)
    late = dialer.cdr(created_at=T0 + 20 * SECOND)  # committed after the scans had passed it
    install_up_to(cdr_db, 6)
    cdr_db.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status) "
        "VALUES (%s, 'cdr_webhook', 1, %s, 'delivered')",
        (on_time, T0 + 10 * SECOND),
    )
    cdr_db.execute(
        "INSERT INTO cdr_webhook.watermark (source_relation, created_at, scanned_from, reconciled_at) "
        "VALUES ('cdr_webhook_source', %s, %s, %s)",
        (T0 + 3 * MINUTE, T0, T0 + 3 * MINUTE),
    )
    assert "reconcile_cursor" not in columns(cdr_db, "watermark")

    # Its select step migrates, scans from the watermark less the lag, and reconciles [T0, T0 + 2 min).
    assert run(cdr_db, 6) == [late]

    assert versions(cdr_db) == [step.version for step in schema.STEPS]
    assert {"reconcile_cursor", "reconcile_until"} <= columns(cdr_db, "watermark")
    assert cdr_db.execute(
        "SELECT reconcile_cursor, reconcile_until FROM cdr_webhook.watermark"
    ).fetchone() == (
        T0 + 2 * MINUTE,
        T0 + 2 * MINUTE,
    )
