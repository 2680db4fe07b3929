"""When the commit watcher fires: the pure decision on what the database says."""

from __future__ import annotations

import datetime as dt

import pytest

from cdr_webhook.watch.firing import (
    NOTIFY_FALLBACK_SECONDS,
    POLLS_PER_INTERVAL,
    WatchState,
    poll_seconds,
    when_to_fire,
)
from cdr_webhook.window import event_scan_bounds

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
S = dt.timedelta(seconds=1)


def state(**fields) -> WatchState:
    return WatchState(**{"now": T0 + 60 * S, "watermark": T0, "initialized": True} | fields)


def fire(seen: WatchState, newest: dt.datetime | None, gap: float = 1.0):
    return when_to_fire(seen, newest, min_gap_seconds=gap, poll_seconds=1.0)


def test_fires_only_for_rows_newer_than_the_watermark_and_the_last_fire():
    assert fire(state(), T0 + S).fire
    assert not fire(state(), T0).fire  # the scan already read up to the watermark
    assert not fire(state(), None).fire  # an empty source
    assert not fire(state(fired_through=T0 + 5 * S, fired_at=T0 + 55 * S), T0 + 5 * S).fire  # fired for
    assert fire(state(fired_through=T0 + 5 * S, fired_at=T0), T0 + 6 * S).fire
    # A scan that moved the watermark past the last fire covers the rows before it.
    assert not fire(state(watermark=T0 + 9 * S, fired_through=T0 + 5 * S), T0 + 8 * S).fire


def test_idle_waits_a_poll_and_a_fire_too_soon_waits_the_rest_of_the_gap():
    idle = fire(state(), T0)
    assert (idle.fire, idle.due, idle.wait_seconds) == (False, False, 1.0)
    soon = fire(state(fired_through=T0, fired_at=T0 + 59.5 * S), T0 + 2 * S, gap=2.0)
    assert (soon.fire, soon.due) == (False, True)
    assert soon.wait_seconds == pytest.approx(1.5)
    assert fire(state(fired_through=T0, fired_at=T0 + 58 * S), T0 + 2 * S, gap=2.0).fire


def test_a_full_run_asks_for_more_once():
    assert fire(state(fired_at=T0, more_at=T0 + S), None).fire
    assert not fire(state(fired_at=T0 + 2 * S, more_at=T0 + S), None).fire  # a run was asked for since


def test_first_start_without_a_scan_takes_a_baseline_instead_of_firing_for_history():
    assert state(initialized=False, watermark=None).needs_baseline
    assert not state(initialized=False).needs_baseline  # a watermark: rows after it are new
    assert fire(state(watermark=None, started_from=T0), T0 + S).fire
    assert not fire(state(watermark=None, started_from=T0), T0).fire


def test_notify_makes_polling_a_slow_fallback():
    assert POLLS_PER_INTERVAL == 2
    assert poll_seconds(1.0, notify_installed=False) == 0.5  # fires stay 1 s apart
    assert poll_seconds(20.0, notify_installed=False) == 10.0
    assert poll_seconds(1.0, notify_installed=True) == NOTIFY_FALLBACK_SECONDS
    assert poll_seconds(60.0, notify_installed=True) == 60.0


def test_an_event_run_scans_to_its_own_clock_from_the_watchers_start():
    now = T0 + 60 * S
    assert event_scan_bounds(now=now, watch_started_from=T0) == (T0 + dt.timedelta(microseconds=1), now)
    assert event_scan_bounds(now=now, watch_started_from=None) == (now, now)  # nothing to read yet


def test_a_fire_no_scan_followed_fires_again_once_a_while_later():
    # The DAG was paused as the watcher fired (the event started nothing), or the run waits behind
    # max_active_runs: the rows are still after the watermark.
    assert not fire(state(fired_through=T0 + 5 * S, fired_at=T0 + 50 * S), T0 + 5 * S).fire  # 10 s ago
    assert fire(state(fired_through=T0 + 5 * S, fired_at=T0 + 30 * S), T0 + 5 * S).fire
    # A scan read them: nothing to do.
    assert not fire(state(watermark=T0 + 9 * S, fired_through=T0 + 5 * S, fired_at=T0), T0 + 5 * S).fire


def test_a_fire_recorded_for_a_row_dated_ahead_counts_up_to_its_own_time():
    # A watcher that counted a row dated an hour ahead recorded fired_through there: the fire covers
    # what existed when it fired, so newer commits fire and a scan past the fire's time ends refires.
    ahead = state(fired_through=T0 + 3600 * S, fired_at=T0 + 10 * S)
    assert ahead.covered == T0 + 10 * S
    assert fire(ahead, T0 + 20 * S).fire
    scanned = state(watermark=T0 + 11 * S, fired_through=T0 + 3600 * S, fired_at=T0 + 10 * S)
    assert not scanned.unscanned_fire(15.0)
    assert not fire(scanned, None).fire
