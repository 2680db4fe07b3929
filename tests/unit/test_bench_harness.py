"""The benchmark harness's pure parts: statistics, ratios, the phases of a try, the tables.

No Airflow, no timing: bench/harness.py itself runs on demand only (docs/benchmarks.md).
"""

from __future__ import annotations

import pytest

from bench.harness import (
    Row,
    concurrency_bound,
    extra_env,
    format_phases,
    format_table,
    parse_args,
    percentile,
    run_seconds,
    run_timeline,
    try_phases,
)


def test_percentile_interpolates_between_ranks_and_is_none_for_nothing() -> None:
    values = [float(v) for v in range(10, 0, -1)]  # 10 … 1, unsorted on purpose
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 95) == pytest.approx(9.55)
    assert percentile(values, 0) == 1
    assert percentile(values, 100) == 10
    assert percentile([7.0], 95) == 7
    assert percentile([], 50) is None


def test_a_rows_rate_and_ratio_to_its_reference() -> None:
    row = Row("per-CDR", 200, 200, 50.0, reference="floor", reference_rate=5.0)
    assert row.rate == pytest.approx(4.0)
    assert row.ratio == pytest.approx(0.8)
    assert Row("floor", 200, 0, None).rate is None
    assert Row("raw", 10, 10, 2.0).ratio is None  # no reference, no ratio


def test_the_concurrency_bound_is_in_flight_over_the_delay() -> None:
    assert concurrency_bound(8, 50) == pytest.approx(160)
    assert concurrency_bound(8, 0) is None


def test_the_table_shows_every_measure_and_a_dash_where_none_applies() -> None:
    rows = [
        Row(
            "floor (no-op DAG)",
            200,
            200,
            40.0,
            peak_task_rss=150 * 2**20,
            peak_sum_rss=1200 * 2**20,
            load="1.00",
        ),
        Row(
            "per-CDR",
            200,
            199,
            50.0,
            reference="floor",
            reference_rate=5.0,
            run_s=40.0,
            latencies_ms=[100.0, 200.0, 300.0],
            note="run failed",
        ),
    ]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| mode | N |")
    assert lines[2] == (
        "| floor (no-op DAG) | 200 | 200 | 40.0 | 5.00 | — | — | — | — | — | — | — | 150 | 1200 | 1.00 |  |"
    )
    assert lines[3] == (
        "| per-CDR | 200 | 199 | 50.0 | 3.98 | floor | 0.80 | 40.0 | 4.97 | 0.99 | 200 | 290 | — | — |  "
        "| run failed |"
    )


def _line(at: str, event: str, **extra: object) -> dict[str, object]:
    return {"timestamp": f"2026-11-30T12:00:{at}Z", "event": event, **extra}


def test_the_phases_of_a_post_cdr_try_from_its_log_and_task_instance() -> None:
    ti = {
        "queued_when": "2026-11-30T12:00:00.000000Z",
        "start_date": "2026-11-30T12:00:00.500000Z",
        "end_date": "2026-11-30T12:00:02.000000Z",
    }
    lines = [
        _line("00.600000", "::group::Pre Execute"),
        _line("01.000000", "Worker startup parse complete", dag_file_parse_ms=300),
        _line("01.100000", "::endgroup::"),
        _line("01.250000", "Sending CDR 42 to endpoint e (try 1, …)"),
        _line("01.300000", "CDR 42 delivered to e: HTTP 200 in 9 ms"),
        _line("01.350000", "::group::Post Execute"),
        _line("01.400000", "::endgroup::"),
    ]
    phases = try_phases(ti, lines)
    assert phases == pytest.approx(
        {
            "queued→start": 500,
            "start→first log": 100,
            "DAG file parse": 300,
            "pre-execute rest": 200,
            "execute: to 'Sending'": 150,
            "execute: 'Sending' on": 100,
            "execute": 250,
            "post-execute": 50,
            "last log→end": 600,
            "start→end": 1500,
        },
        abs=0.01,  # epoch seconds as floats: microseconds are not exact
    )
    assert try_phases({"start_date": None, "end_date": None}, lines) == {}


def test_the_phase_table_takes_the_median_of_each_column() -> None:
    table = format_phases(
        {"no-op": [{"DAG file parse": 10.0}, {"DAG file parse": 30.0}], "post_cdr": [{"execute": 5.0}]}
    ).splitlines()
    assert table[0] == "| phase (median ms per try) | no-op (2 tries) | post_cdr (1 tries) |"
    assert table[2] == "| DAG file parse | 20 | — |"
    assert table[3] == "| execute | — | 5 |"


def test_airflow_settings_pass_through_as_name_value_pairs_and_a_malformed_one_is_named() -> None:
    assert extra_env(["AIRFLOW__API__WORKERS=2", "AIRFLOW__X__Y=a=b"]) == {
        "AIRFLOW__API__WORKERS": "2",
        "AIRFLOW__X__Y": "a=b",
    }
    assert parse_args(["--env", "AIRFLOW__API__WORKERS=2"]).env == ["AIRFLOW__API__WORKERS=2"]
    with pytest.raises(SystemExit, match="AIRFLOW__API__WORKERS"):
        parse_args(["--env", "AIRFLOW__API__WORKERS"])


def test_where_a_runs_wall_time_goes_from_its_task_instances() -> None:
    run = {"queued_at": "2026-11-30T12:00:00.000000Z", "end_date": "2026-11-30T12:00:10.000000Z"}
    tis = [
        {
            "map_index": -1,
            "start_date": "2026-11-30T12:00:01.000000Z",
            "end_date": "2026-11-30T12:00:02.500000Z",
        },
        {
            "map_index": 0,
            "start_date": "2026-11-30T12:00:03.000000Z",
            "end_date": "2026-11-30T12:00:06.000000Z",
        },
        {
            "map_index": 1,
            "start_date": "2026-11-30T12:00:03.500000Z",
            "end_date": "2026-11-30T12:00:09.000000Z",
        },
        {"map_index": 2, "start_date": None, "end_date": None},  # never started (skipped upstream)
    ]
    assert run_timeline(run, tis) == pytest.approx(
        {
            "run queued→select start": 1000,
            "select start→end": 1500,
            "select end→first mapped start": 500,
            "mapped: first start→last end": 6000,
            "mapped: first start→last start": 500,
            "last mapped end→run end": 1000,
            "run (wall)": 10000,
        }
    )
    assert format_phases({"chunk": [run_timeline(run, tis)]}, "run").splitlines()[0] == (
        "| phase (median ms per run) | chunk (1 runs) |"
    )
    assert run_timeline(run, tis[:1]) == {}  # no mapped task ran: nothing to split
    started = run_timeline(run | {"start_date": "2026-11-30T12:00:00.400000Z"}, tis)
    assert started["run queued→run start"] == pytest.approx(400)  # where the REST run start→end begins


def test_a_run_times_from_its_queued_at_and_from_its_start_date_to_its_end() -> None:
    run = {
        "queued_at": "2026-11-30T12:00:00.000000Z",
        "start_date": "2026-11-30T12:00:01.000000Z",
        "end_date": "2026-11-30T12:00:10.000000Z",
    }
    assert run_seconds(run) == pytest.approx(10)
    assert run_seconds(run, "start_date") == pytest.approx(9)
    assert run_seconds(run | {"end_date": None}) is None
    row = Row("chunk", 900, 900, 10.0, reference="raw", reference_rate=200.0, run_s=9.0)
    assert (row.ratio, row.run_ratio) == pytest.approx((0.45, 0.5))
    by_floor = Row("per-CDR", 90, 90, 10.0, "floor", 10.0, run_s=9.0, reference_run_rate=12.5)
    assert by_floor.run_ratio == pytest.approx(0.8)  # against the floor's own start→end rate
