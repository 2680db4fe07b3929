from __future__ import annotations

import dataclasses
import datetime as dt
import re

import pytest

from cdr_webhook.setting_values import parse_settings, relation_parts, schedule_interval
from cdr_webhook.settings import Settings, SettingsError


def test_an_absent_option_keeps_its_default_and_a_set_one_changes_only_itself():
    assert parse_settings({}) == Settings()
    assert parse_settings({"retries": "2"}) == dataclasses.replace(Settings(), retries=2)


def test_schedule_is_cron_or_a_fixed_interval():
    assert parse_settings({"schedule": "0 * * * *"}).schedule == "0 * * * *"
    assert parse_settings({"schedule": "30s"}).schedule == "30s"
    assert schedule_interval("30s") == dt.timedelta(seconds=30)
    assert schedule_interval("5m") == dt.timedelta(minutes=5)
    assert schedule_interval("0 * * * *") is None


def test_values_are_parsed():
    settings = parse_settings(
        {
            "schedule": "*/5 * * * *",
            "lag_seconds": "0",
            "max_cdrs_per_run": "200",
            "request_timeout_seconds": "2.5",
            "source_relation": "billing.cdr_feed",
            "start_from": "2026-11-01T00:00:00+00:00",
        }
    )
    assert settings.schedule == "*/5 * * * *"
    assert settings.max_cdrs_per_run == 200
    assert settings.lag_seconds == 0
    assert settings.request_timeout_seconds == 2.5
    assert settings.source_relation == "billing.cdr_feed"
    assert settings.start_from == dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    assert parse_settings({"allowed_networks": "127.0.0.0/8, ::1/128"}).allowed_networks == (
        "127.0.0.0/8",
        "::1/128",
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"max_cdrs_per_run": "1024", "cdrs_per_task": "1"},
            "AIRFLOW__CDR_WEBHOOK__MAX_CDRS_PER_RUN=1024 must stay below",
        ),
        ({"max_cdrs_per_run": "many"}, "AIRFLOW__CDR_WEBHOOK__MAX_CDRS_PER_RUN='many' is not a whole number"),
        ({"retries": "-1"}, "AIRFLOW__CDR_WEBHOOK__RETRIES='-1' must be at least 0"),
        ({"schedule": "every minute"}, "SCHEDULE='every minute' is neither a 5-field cron expression nor"),
        ({"schedule": "*/10 * * * * *"}, "is neither a 5-field cron expression"),
        ({"schedule": "2s"}, "an interval schedule must be at least 5s"),
        ({"start_from": "2026-11-01"}, "needs a UTC offset"),
        ({"source_relation": "a.b.c"}, "must be a relation name"),
        ({"source_relation": 'billing."cdr'}, "has an unclosed double quote"),
        ({"source_relation": "billing..cdr"}, "has an empty part"),
        ({"request_timeout_seconds": "0"}, "must be greater than 0"),
        ({"claim_timeout_seconds": "600"}, "CLAIM_TIMEOUT_SECONDS=600 must exceed"),
        ({"unrouted_clients": "drop"}, "UNROUTED_CLIENTS='drop' must be one of: default, skip"),
        ({"allowed_networks": "10.0.0.1/8"}, "ALLOWED_NETWORKS: '10.0.0.1/8' is not a CIDR network"),
        ({"pause_after_hours": "-1"}, "PAUSE_AFTER_HOURS='-1' must be greater than 0"),
    ],
)
def test_bad_values_name_the_variable(raw, message):
    with pytest.raises(SettingsError, match=message):
        parse_settings(raw)


def test_reconciliation_settings():
    settings = parse_settings(
        {"reconcile_hours": "0", "reconcile_interval_seconds": "600", "reconcile_cdrs_per_run": "500"}
    )
    assert (settings.reconcile_hours, settings.reconcile_interval_seconds) == (0, 600)
    assert settings.reconcile_cdrs_per_run == 500
    with pytest.raises(SettingsError, match="AIRFLOW__CDR_WEBHOOK__RECONCILE_CDRS_PER_RUN='0' must be"):
        parse_settings({"reconcile_cdrs_per_run": "0"})
    with pytest.raises(SettingsError, match="AIRFLOW__CDR_WEBHOOK__RECONCILE_INTERVAL_SECONDS='0' must be"):
        parse_settings({"reconcile_interval_seconds": "0"})
    with pytest.raises(SettingsError, match="AIRFLOW__CDR_WEBHOOK__RECONCILE_HOURS='-1' must be"):
        parse_settings({"reconcile_hours": "-1"})


def test_the_claim_timeout_must_outlast_every_wait_of_a_live_run():
    # 900 s between tries, then a try: 60 s slot wait + 15 s deadline + 60 s database work = 1035 s.
    assert parse_settings({"claim_timeout_seconds": "1036"}).attempt_timeout.total_seconds() == 135
    with pytest.raises(
        SettingsError, match="CLAIM_TIMEOUT_SECONDS=1036 must exceed .*slot_wait_seconds.* \\(1135\\)"
    ):
        parse_settings({"claim_timeout_seconds": "1036", "slot_wait_seconds": "160"})
    with pytest.raises(SettingsError, match="must exceed .* \\(1055\\)"):
        parse_settings({"claim_timeout_seconds": "1036", "request_timeout_seconds": "35"})


def test_isolation_settings():
    settings = parse_settings({"max_active_runs": "2", "slot_wait_seconds": "0"})
    assert (settings.max_active_runs, settings.slot_wait_seconds) == (2, 0)
    with pytest.raises(SettingsError, match="AIRFLOW__CDR_WEBHOOK__MAX_ACTIVE_RUNS='0' must be at least 1"):
        parse_settings({"max_active_runs": "0"})


def test_retention_must_outlast_the_reconciliation_window():
    assert parse_settings({"retention_days": "0", "reconcile_hours": "48"}).retention_days == 0
    with pytest.raises(
        SettingsError, match="RETENTION_DAYS=1 must keep the ledger longer than reconcile_hours"
    ):
        parse_settings({"retention_days": "1", "reconcile_hours": "24"})


def test_cdrs_per_task_is_validated():
    with pytest.raises(
        SettingsError, match="AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK='0' must be auto or at least 1"
    ):
        parse_settings({"cdrs_per_task": "0"})
    with pytest.raises(
        SettingsError, match="AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK='many' must be auto or a whole number"
    ):
        parse_settings({"cdrs_per_task": "many"})


def test_cdrs_per_task_auto_sizes_the_tasks_and_takes_more_cdrs_per_run():
    auto = parse_settings({"cdrs_per_task": " Auto ", "chunk_above": "40"})
    assert auto.auto_sized
    assert auto.chunk_above == 40
    fixed = parse_settings({"cdrs_per_task": "1"})
    assert not fixed.auto_sized
    assert auto.cdrs_per_run > fixed.cdrs_per_run  # chunks carry far more than a task per CDR could
    assert parse_settings({"cdrs_per_task": "auto", "max_cdrs_per_run": "50000"}).cdrs_per_run == 50_000
    with pytest.raises(SettingsError, match="CHUNK_ABOVE='0' must be at least 1"):
        parse_settings({"chunk_above": "0"})


def test_a_sized_chunk_may_send_every_cdr_at_its_deadline():
    settings = parse_settings({"request_timeout_seconds": "5", "slot_wait_seconds": "10"})
    assert settings.chunk_timeout_for(300) == dt.timedelta(seconds=10 + 300 * 5 + 60)


def test_in_chunk_mode_max_cdrs_per_run_counts_cdrs_and_the_chunks_must_fit_max_map_length():
    settings = parse_settings({"cdrs_per_task": "100", "max_cdrs_per_run": "50000"}, max_map_length=1024)
    assert (settings.cdrs_per_task, settings.max_cdrs_per_run) == (100, 50000)
    with pytest.raises(SettingsError, match=r"makes more chunk tasks than Airflow's \[core\] max_map_length"):
        parse_settings({"cdrs_per_task": "10", "max_cdrs_per_run": "10240"}, max_map_length=1024)
    with pytest.raises(SettingsError, match="every CDR of a run is one mapped task"):
        parse_settings({"cdrs_per_task": "1", "max_cdrs_per_run": "1024"}, max_map_length=1024)


def test_a_chunk_try_may_send_every_cdr_of_a_full_chunk_at_its_deadline():
    settings = parse_settings(
        {"cdrs_per_task": "20", "request_timeout_seconds": "5", "slot_wait_seconds": "10"}
    )
    assert settings.chunk_timeout == dt.timedelta(seconds=10 + 20 * 5 + 60)


def test_watch_interval_is_seconds_and_zero_turns_watching_off():
    assert parse_settings({"watch_interval_seconds": "0"}).watch_interval_seconds == 0
    assert parse_settings({"watch_interval_seconds": "0.5"}).watch_interval_seconds == 0.5
    for raw, message in (("-1", r"must be 0 \(off\)"), ("0.01", "at least 0.1"), ("soon", "is not a number")):
        with pytest.raises(SettingsError, match=message) as err:
            parse_settings({"watch_interval_seconds": raw})
        assert "AIRFLOW__CDR_WEBHOOK__WATCH_INTERVAL_SECONDS" in str(err.value)


def test_the_pages_statement_timeout_is_seconds_and_must_be_positive():
    assert parse_settings({"page_statement_timeout_seconds": "2.5"}).page_statement_timeout_seconds == 2.5
    with pytest.raises(SettingsError, match="AIRFLOW__CDR_WEBHOOK__PAGE_STATEMENT_TIMEOUT_SECONDS"):
        parse_settings({"page_statement_timeout_seconds": "0"})


def test_max_payload_bytes_is_whole_bytes_of_at_least_1024():
    assert parse_settings({"max_payload_bytes": "1048576"}).max_payload_bytes == 1048576
    assert parse_settings({"max_payload_bytes": "1024"}).max_payload_bytes == 1024
    for raw, message in (
        ("1023", "must be at least 1024"),
        ("256k", "is not a whole number"),
        ("-1", "1024"),
    ):
        with pytest.raises(
            SettingsError, match=f"AIRFLOW__CDR_WEBHOOK__MAX_PAYLOAD_BYTES='{raw}' .*{message}"
        ):
            parse_settings({"max_payload_bytes": raw})


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("cdr_webhook_source", ("cdr_webhook_source",)),
        ("Billing.CDR_Feed", ("billing", "cdr_feed")),  # unquoted parts fold, as in SQL
        ('"Billing"."CDR Feed"', ("Billing", "CDR Feed")),  # quoted parts keep their case and spaces
        (' billing . "a.b""c" ', ("billing", 'a.b"c')),  # a quoted dot and quote are part of the name
        ("ÉTÉ.Vue", ("ÉtÉ", "vue")),  # PostgreSQL folds ASCII letters only (UTF-8)
    ],
)
def test_a_relation_name_is_read_as_postgresql_reads_it(name, parts):
    assert relation_parts(name) == parts
    assert parse_settings({"source_relation": name}).source_relation == name


def test_owner_alert_settings_are_minutes_a_fraction_and_a_connection_id():
    default = Settings()
    assert (default.owner_alert_window_minutes, default.owner_alert_interval_minutes) == (60, 60)
    assert (default.owner_alert_failure_rate, default.owner_alert_min_attempts) == (0.5, 20)
    assert default.owner_alert_smtp_conn_id == "smtp_default"
    parsed = parse_settings(
        {
            "owner_alert_window_minutes": "15",
            "owner_alert_interval_minutes": "240",
            "owner_alert_failure_rate": "0",
            "owner_alert_min_attempts": "5",
            "owner_alert_smtp_conn_id": " smtp_owners ",
        }
    )
    assert parsed.owner_alert_window_minutes == 15
    assert parsed.owner_alert_interval_minutes == 240
    assert parsed.owner_alert_failure_rate == 0  # off
    assert parsed.owner_alert_min_attempts == 5
    assert parsed.owner_alert_smtp_conn_id == "smtp_owners"


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        (
            "owner_alert_window_minutes",
            "4",
            "AIRFLOW__CDR_WEBHOOK__OWNER_ALERT_WINDOW_MINUTES='4' must be at least 5",
        ),
        ("owner_alert_failure_rate", "50", "must be a fraction from 0 (off) to 1"),
        ("owner_alert_failure_rate", "-0.1", "must be a fraction from 0 (off) to 1"),
        ("owner_alert_failure_rate", "half", "OWNER_ALERT_FAILURE_RATE='half' is not a number"),
        ("owner_alert_interval_minutes", "0", "must be at least 1"),
        ("owner_alert_smtp_conn_id", " ", "must be an Airflow connection id"),
    ],
)
def test_bad_owner_alert_settings_name_the_variable(name, raw, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        parse_settings({name: raw})
