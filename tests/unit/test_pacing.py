"""The rate limit's pace: spacing, batches, what fits before a try's end, and sliding windows under jitter."""

from __future__ import annotations

import random

import pytest

from cdr_webhook import pacing
from cdr_webhook.endpoint_config import EndpointConfigError, parse_endpoint
from cdr_webhook.setting_values import parse_settings
from cdr_webhook.settings import SettingsError


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(20, 1.1 / 20), (1, 1.1), (2.5, 1.1 / 2), (0.5, 2.2), (1000, 1.1 / 1000)],
)
def test_the_spacing_spreads_a_limit_of_n_over_more_than_a_second(rate, expected):
    assert pacing.spacing(rate) == pytest.approx(expected)


@pytest.mark.parametrize("rate", [0, -1, float("inf"), float("nan")])
def test_a_rate_that_is_no_rate_is_refused(rate):
    with pytest.raises(ValueError, match="positive number of POSTs a second"):
        pacing.spacing(rate)


def test_a_batch_is_a_quarter_second_of_the_pace_and_at_least_one():
    assert pacing.batch(20) == 4  # 0.25 s / 0.055 s
    assert pacing.batch(1) == 1
    assert pacing.batch(0.1) == 1
    assert pacing.batch(1000) == 227


@pytest.mark.parametrize(
    ("wanted", "first_in", "spacing", "within", "expected"),
    [
        (5, 0.0, 0.1, 10.0, 5),  # all fit
        (5, 0.0, 0.1, 0.25, 3),  # 0, 0.1, 0.2
        (5, 0.2, 0.1, 0.2, 1),  # only the first, on the edge
        (5, 0.3, 0.1, 0.2, 0),  # the first is already too late
        (0, 0.0, 0.1, 10.0, 0),
        (3, 0.0, 0.1, 0.2, 3),  # 0.2 exactly is still in (no float rounding loses it)
    ],
)
def test_only_the_send_times_before_the_end_are_reserved(wanted, first_in, spacing, within, expected):
    assert pacing.fitting(wanted, first_in=first_in, spacing=spacing, within=within) == expected


def test_most_in_window_counts_a_closed_sliding_window():
    assert pacing.most_in_window([]) == 0
    assert pacing.most_in_window([0.0, 0.5, 1.0]) == 3  # both edges count
    assert pacing.most_in_window([0.0, 0.5, 1.0001]) == 2
    assert pacing.most_in_window([3.0, 0.0, 2.5, 2.0, 2.9]) == 4  # 2.0 to 3.0


def test_exactly_one_over_n_apart_would_let_n_plus_one_into_a_second():
    # Why the spacing has slack: the naive pace breaks a receiver counting a closed window.
    assert pacing.most_in_window([k / 20 for k in range(100)]) == 21


@pytest.mark.parametrize("rate", [1, 3, 20, 50])
def test_paced_sends_stay_within_the_limit_under_jitter_below_the_slack(rate):
    # Every send late by up to LATE_SECONDS (a sender's wake-up) and moved by up to the rest of the
    # slack on the way (clock mapping, network): no closed one-second window holds more than the limit.
    rng = random.Random(rate)
    way = pacing.SLACK_SECONDS - pacing.LATE_SECONDS - 1e-6
    spacing = pacing.spacing(rate)
    arrivals = [
        k * spacing + rng.uniform(0, pacing.LATE_SECONDS) + rng.uniform(0, way) for k in range(rate * 30)
    ]
    assert rate - 1 <= pacing.most_in_window(arrivals) <= rate
    # The adversarial case: the first of a run of n + 1 as late as allowed, the last on time.
    worst = [k * spacing + (pacing.LATE_SECONDS + way if k % (rate + 1) == 0 else 0) for k in range(200)]
    assert pacing.most_in_window(worst) <= rate


def test_the_pace_is_about_the_limit():
    # 2,000 CDRs at 20/s take 110 s, not 100: the slack is the price.
    assert 2000 * pacing.spacing(20) == pytest.approx(110)


def parse(extra):
    return parse_endpoint("cdr_webhook_client_7", host="https://hooks.example.com/cdr", extra=extra)


def test_the_extra_sets_an_endpoints_limit_over_the_setting():
    assert parse({"rate_limit_per_second": 20}).rate_limit(None) == 20.0
    assert parse({"rate_limit_per_second": "2.5"}).rate_limit(50.0) == 2.5
    assert parse({"rate_limit_per_second": 0.5}).rate_limit(None) == 0.5
    assert parse({}).rate_limit(50.0) == 50.0
    assert parse({}).rate_limit(None) is None


@pytest.mark.parametrize("value", [0, -3, 1001, "fast", True, [20], "NaN", "Infinity"])
def test_a_bad_extra_names_the_connection_and_the_field(value):
    with pytest.raises(
        EndpointConfigError, match="connection 'cdr_webhook_client_7' extra 'rate_limit_per_second'"
    ):
        parse({"rate_limit_per_second": value})


def test_the_setting_is_unset_by_default_and_parsed_when_set():
    assert parse_settings({}).rate_limit_per_second is None
    assert parse_settings({"rate_limit_per_second": ""}).rate_limit_per_second is None
    assert parse_settings({"rate_limit_per_second": "20"}).rate_limit_per_second == 20.0
    assert parse_settings({"rate_limit_per_second": "0.5"}).rate_limit_per_second == 0.5


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "lots", "1001"])
def test_a_bad_setting_names_the_variable(raw):
    with pytest.raises(SettingsError, match="AIRFLOW__CDR_WEBHOOK__RATE_LIMIT_PER_SECOND"):
        parse_settings({"rate_limit_per_second": raw})
