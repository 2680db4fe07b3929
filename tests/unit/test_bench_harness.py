"""The benchmark harness's pure parts: statistics, ratios, the phases of a try, the tables.

No Airflow, no timing: the benchmarks themselves run on demand only (docs/benchmarks.md).
"""

from __future__ import annotations

import ast
import datetime as dt
from pathlib import Path

import pytest

from bench.harness import parse_args
from bench.phases import format_phases, run_timeline, try_phases
from bench.records import attempt
from bench.rest import run_seconds
from bench.stacks import extra_env
from bench.stats import percentile
from bench.table import Row, concurrency_bound, format_table
from cdr_webhook.outcome import Claim, Verdict
from cdr_webhook.signing import webhook_id

BENCH = Path(__file__).resolve().parents[2] / "bench"


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


def test_a_row_measured_against_a_reference_keeps_its_rate_by_run_start_to_end() -> None:
    row = Row("per-CDR", 90, 90, 10.0, run_s=9.0).against("floor", 10.0, 12.5)
    assert (row.reference, row.ratio, row.run_ratio) == ("floor", pytest.approx(0.9), pytest.approx(0.8))
    bound = Row("raw", 10, 10, 2.0).against("bound", 10.0)
    assert bound.run_ratio is None  # the raw loop has no run start→end
    assert bound.ratio == pytest.approx(0.5)


def test_env_pairs_read_alike_given_once_or_one_flag_each() -> None:
    assert parse_args(["--env", "A=1", "B=2=3"]).env == ["A=1", "B=2=3"]
    assert parse_args(["--env", "A=1", "--env", "B=2=3"]).env == ["A=1", "B=2=3"]
    assert extra_env(["A=1", "B=2=3"]) == {"A": "1", "B": "2=3"}  # the value keeps its own '='


def test_a_hand_made_attempt_leaves_its_row_in_the_status_asked_for() -> None:
    claim = Claim("cdr-1", "cdr_webhook", 7, dt.datetime(2026, 12, 1, tzinfo=dt.UTC), "queued", 2)
    made = attempt(claim, "failed", 503, "HTTP 503", "busy", 12)
    assert made.decision.verdict is Verdict.FAIL_NOW
    assert (made.number, made.result.http_status, made.result.latency_ms) == (3, 503, 12)
    assert made.webhook_id == webhook_id("cdr-1", "cdr_webhook")
    assert attempt(claim, "queued").decision.verdict is Verdict.RETRY
    with pytest.raises(ValueError, match="'skipped'"):
        attempt(claim, "skipped")


def test_the_bench_modules_are_small_import_no_test_module_and_edit_no_sys_path() -> None:
    """The benchmarks stand on the package's public API: tests may import bench, never the reverse."""
    for path in sorted(BENCH.glob("*.py")):
        assert len(path.read_text().splitlines()) < 400, f"{path.name}: a module of one concern is shorter"
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                names = []
            for name in names:
                assert name.split(".")[0] != "tests", f"{path.name} imports {name}"
                private = [p for p in name.split(".") if p.startswith("_") and not p.endswith("__")]
                assert not private, f"{path.name} reaches the private module {name}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) != ("sys", "path"), f"{path.name} edits sys.path"
