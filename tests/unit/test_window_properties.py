"""Property tests of the window arithmetic: consecutive runs tile time, with no gap and no overlap.

* Backfill and manual runs over consecutive data intervals (cron boundaries at local wall times in
  zones with DST: the hour that repeats and the hour that never happens), given as the interval or
  as Params with their offsets: each window ends where the next begins.
* Scheduled runs: however the watermark moves within what a run has scanned, the next scan starts
  at or before where the last ended (the lag re-reads, it never skips).
* The page's UTC days (completeness and "redeliver this filter's result") tile days exactly.
* Leap seconds: Python's datetime has no 23:59:60, and neither do PostgreSQL's timestamps or POSIX
  time, which the CDRs' created_at come from. So a window across a leap second is the same
  instants as any other (23:59:59 to 00:00:00 of 2016-12-31/2017-01-01 is one second), and a
  Param naming the leap second itself (``…T23:59:60Z``) is refused with a message, never a crash.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdr_webhook.web.forms import run_conf
from cdr_webhook.window import InvalidRunRequest, Window, plan_scan, plan_window

ZONES = st.sampled_from(
    ["Europe/Madrid", "America/New_York", "Australia/Lord_Howe", "America/Santiago", "Asia/Kolkata", "UTC"]
).map(zoneinfo.ZoneInfo)
NOW = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
# The days DST changes in the zones above (and the leap-second days of 2015-2016) are in range.
DAYS = st.dates(min_value=dt.date(2015, 1, 1), max_value=dt.date(2030, 12, 31))


@st.composite
def boundaries(draw: st.DrawFn) -> list[dt.datetime]:
    """Consecutive cron boundaries at one local wall time (hourly, or daily), as Airflow's cron
    timetable in a zone makes them: each local time resolved to its instant, in order."""
    zone, day = draw(ZONES), draw(DAYS)
    hour, minute = draw(st.integers(0, 23)), draw(st.sampled_from([0, 15, 30, 45]))
    hourly = draw(st.booleans())
    instants = []
    for step in range(draw(st.integers(2, 60))):
        local = dt.datetime.combine(day, dt.time(hour, minute)) + (
            dt.timedelta(hours=step) if hourly else dt.timedelta(days=step)
        )
        fold = draw(st.sampled_from([0, 1]))  # either instant of a repeated wall time
        instants.append(local.replace(tzinfo=zone, fold=fold))
    utc = sorted({instant.astimezone(dt.UTC) for instant in instants})
    return [instant.astimezone(zone) for instant in utc]


def tiles(windows: list[tuple[dt.datetime, dt.datetime]], first: dt.datetime, last: dt.datetime) -> None:
    for (_, end), (start, _) in zip(windows, windows[1:], strict=False):
        assert end == start  # no gap, no overlap
    assert windows[0][0] == first
    assert windows[-1][1] == last
    assert all(start < end for start, end in windows)


@settings(max_examples=100)
@given(boundaries(), st.booleans())
def test_consecutive_data_intervals_in_any_zone_tile_with_no_gap_or_overlap(points, as_params):
    if len(points) < 2:
        return
    windows = []
    for start, end in zip(points, points[1:], strict=False):
        params = {"window_start": start.isoformat(), "window_end": end.isoformat()} if as_params else {}
        window = plan_window(params=params, interval_start=start, interval_end=end, now=NOW)
        windows.append((window.start, window.end))
    tiles(windows, points[0], points[-1])


@settings(max_examples=100)
@given(
    first=st.datetimes(
        min_value=dt.datetime(2015, 1, 1), max_value=dt.datetime(2030, 1, 1), timezones=st.just(dt.UTC)
    ),
    steps=st.lists(st.integers(1, 3600), min_size=1, max_size=50),
    seen=st.lists(st.floats(0, 1), min_size=50, max_size=50),
    lag=st.integers(0, 600),
)
def test_scheduled_scans_never_leave_a_gap_whatever_the_watermark(first, steps, seen, lag):
    watermark, covered_to, interval_start = None, None, first
    for step, fraction in zip(steps, seen, strict=False):
        interval_end = interval_start + dt.timedelta(seconds=step)
        scan = plan_scan(
            watermark=watermark, interval_start=interval_start, interval_end=interval_end,
            lag_seconds=lag, start_from=None,
        )  # fmt: skip
        assert scan.start <= scan.end == interval_end
        if covered_to is not None:
            assert scan.start <= covered_to  # no gap after the last scan
        # The watermark moves to the newest CDR this scan saw: anywhere in it, never past its end.
        newest = scan.start + (scan.end - scan.start) * fraction
        watermark = newest if watermark is None else max(watermark, newest)
        covered_to, interval_start = scan.end, interval_end


@settings(max_examples=200)
@given(DAYS, st.integers(1, 40))
def test_the_pages_utc_days_tile(day, count):
    windows = []
    for n in range(count):
        conf = run_conf(
            policy="missing", since=str(day + dt.timedelta(n)), to=str(day + dt.timedelta(n)), client=""
        )
        windows.append(
            (dt.datetime.fromisoformat(conf["window_start"]), dt.datetime.fromisoformat(conf["window_end"]))
        )
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    tiles(windows, start, start + dt.timedelta(days=count))
    assert all(end - start == dt.timedelta(days=1) for start, end in windows)  # UTC days: no 23 or 25 h


@pytest.mark.parametrize(
    "moment", ["2016-12-31T23:59:60Z", "2015-06-30T23:59:60+00:00", "2016-12-31T23:59:60.5Z"]
)
def test_a_leap_second_param_is_refused_with_a_message(moment):
    with pytest.raises(InvalidRunRequest, match="is not an ISO 8601 timestamp"):
        plan_window(params={"window_start": moment, "window_end": "2017-01-01T01:00:00Z"},
                    interval_start=None, interval_end=None, now=NOW)  # fmt: skip


@settings(max_examples=100)
@given(st.sampled_from(["2015-06-30", "2016-12-31"]), st.integers(1, 3600), st.integers(1, 3600))
def test_windows_across_a_leap_second_tile_and_count_it_as_nothing(day, before, after):
    midnight = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC) + dt.timedelta(days=1)
    first = param_window(midnight - dt.timedelta(seconds=before), midnight)
    second = param_window(midnight, midnight + dt.timedelta(seconds=after))
    assert first.end == second.start
    assert (second.end - first.start).total_seconds() == before + after  # POSIX time: no 61st second


def param_window(start: dt.datetime, end: dt.datetime) -> Window:
    params = {"window_start": start.isoformat(), "window_end": end.isoformat()}
    return plan_window(params=params, interval_start=None, interval_end=None, now=NOW)
