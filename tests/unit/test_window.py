from __future__ import annotations

import datetime as dt

import pytest

from cdr_webhook.window import InvalidRunRequest, Window, plan_scan, plan_window

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
NOW = T0 + dt.timedelta(hours=1)


def test_first_scan_starts_at_the_interval_start_not_at_history():
    scan = plan_scan(
        watermark=None,
        interval_start=T0,
        interval_end=T0 + dt.timedelta(minutes=1),
        lag_seconds=60,
        start_from=None,
    )
    assert (scan.start, scan.end) == (T0, T0 + dt.timedelta(minutes=1))


def test_first_scan_honours_start_from():
    since = T0 - dt.timedelta(days=3)
    scan = plan_scan(
        watermark=None,
        interval_start=T0,
        interval_end=T0 + dt.timedelta(minutes=1),
        lag_seconds=60,
        start_from=since,
    )
    assert scan.start == since


def test_later_scans_reread_the_lag_before_the_watermark():
    scan = plan_scan(
        watermark=T0,
        interval_start=T0,
        interval_end=T0 + dt.timedelta(minutes=1),
        lag_seconds=90,
        start_from=None,
    )
    assert scan.start == T0 - dt.timedelta(seconds=90)


def test_window_defaults_to_the_data_interval():
    window = plan_window(params={}, interval_start=T0, interval_end=T0 + dt.timedelta(minutes=5), now=NOW)
    assert window == Window(start=T0, end=T0 + dt.timedelta(minutes=5), policy="missing", client_id=None)


def test_window_params_win_and_naive_times_are_utc():
    window = plan_window(
        params={
            "window_start": "2026-11-28T08:00:00",
            "window_end": "2026-11-28T08:30:00Z",
            "policy": "failed",
            "client_id": "7",
        },
        interval_start=T0,
        interval_end=T0 + dt.timedelta(minutes=5),
        now=NOW,
    )
    assert window.start == dt.datetime(2026, 11, 28, 8, 0, tzinfo=dt.UTC)
    assert window.end == dt.datetime(2026, 11, 28, 8, 30, tzinfo=dt.UTC)
    assert (window.policy, window.client_id) == ("failed", 7)


@pytest.mark.parametrize(
    ("params", "interval", "message"),
    [
        ({}, (None, None), "give both Params window_start and window_end"),
        ({"window_start": "2026-11-28T08:00:00+00:00"}, (None, None), "give both"),
        (
            {"window_start": "2026-11-28T08:30:00+00:00", "window_end": "2026-11-28T08:00:00+00:00"},
            (None, None),
            "must be after window_start",
        ),
        (
            {"window_start": "2026-11-28T08:00:00+00:00", "window_end": "2027-01-01T00:00:00+00:00"},
            (None, None),
            "is in the future",
        ),
        (
            {"window_start": "yesterday", "window_end": "2026-11-28T08:00:00+00:00"},
            (None, None),
            "not an ISO 8601 timestamp",
        ),
        ({"policy": "everything"}, (T0, T0 + dt.timedelta(minutes=1)), "policy 'everything' is not one of"),
        ({"client_id": "acme"}, (T0, T0 + dt.timedelta(minutes=1)), "client_id 'acme' is not a whole number"),
    ],
)
def test_bad_requests_say_why(params, interval, message):
    with pytest.raises(InvalidRunRequest, match=message):
        plan_window(params=params, interval_start=interval[0], interval_end=interval[1], now=NOW)
