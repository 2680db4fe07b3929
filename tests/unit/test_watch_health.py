"""What the commit watcher's recorded health means for an operator (cdr_webhook.ledger.watch_health)."""

from __future__ import annotations

import datetime as dt

import pytest

from cdr_webhook.ledger import watch_health as health

NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)


def recorded(seen_ago: float | None, state: str = "watching", every: float = 5.0, error: str | None = None):
    seen = None if seen_ago is None else NOW - dt.timedelta(seconds=seen_ago)
    return health.Health(NOW, seen, state, NOW - dt.timedelta(minutes=3), error, every)


def test_a_watcher_reporting_on_time_is_healthy_and_says_so_in_one_short_line():
    verdict = health.assess(recorded(2), interval_seconds=1)
    assert verdict.ok
    assert verdict.headline == "commit watcher: watching, last seen 2 s ago"
    assert verdict.advice == ""
    assert verdict.age_seconds == 2


@pytest.mark.parametrize(
    ("row", "interval", "state", "says"),
    [
        (recorded(2), 0, "off", "off (watch_interval_seconds = 0)"),
        (None, 1, "never_seen", "triggerer may not be running"),
        (recorded(None), 1, "never_seen", "never seen"),
        (recorded(26), 1, "stale", "last seen 26 s ago (it reports every 5 s): the triggerer may be down"),
        (recorded(3 * 3600), 1, "stale", "last seen 3 h ago"),
        (recorded(3, "error", 8, "OperationalError: refused"), 1, "error", "failing for 3 min"),
        (recorded(3, "source_failing", 30, "no column"), 1, "source_failing", "the source check fails"),
    ],
)
def test_every_way_the_watcher_cannot_work_says_what_it_costs_and_what_to_do(row, interval, state, says):
    verdict = health.assess(row, interval_seconds=interval)
    assert not verdict.ok
    assert verdict.state == state
    assert says in verdict.headline
    assert verdict.advice
    if state != "source_failing":  # that one delivers nothing at all, and says so
        assert "minute schedule only" in verdict.headline


def test_staleness_follows_the_period_the_watcher_recorded():
    # A watcher woken by NOTIFY polls every 15 s, one whose source check fails rechecks every 30 s.
    assert health.assess(recorded(40, every=15), interval_seconds=1).ok
    assert health.assess(recorded(56, every=15), interval_seconds=1).state == "stale"
    assert health.assess(recorded(90, "source_failing", 30, "x"), interval_seconds=1).state != "stale"
    assert health.assess(recorded(101, "source_failing", 30, "x"), interval_seconds=1).state == "stale"


def test_an_error_is_kept_to_one_bounded_line():
    assert health.one_line("a\n  b\tc") == "a b c"
    long = health.one_line("x" * 2000)
    assert len(long) == health.MAX_ERROR_CHARS
    assert long.endswith("…")
