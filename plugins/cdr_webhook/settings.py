"""The ``[cdr_webhook]`` settings: one object, read once, each with a documented default.

Every setting is an Airflow option, so ``AIRFLOW__CDR_WEBHOOK__<NAME>`` sets it. Each option's text is
read by its parser (:mod:`cdr_webhook.setting_values`, pure); :func:`cdr_webhook.adapters.load_settings`
reads the texts from Airflow's configuration; :mod:`cdr_webhook.setting_docs` describes each option.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

SECTION = "cdr_webhook"

#: Connection ids: the CDR database (Postgres) and the default endpoint (HTTP).
CDR_DB_CONN_ID = "cdr_db"
DEFAULT_ENDPOINT_CONN_ID = "cdr_webhook"

#: The DAG and its tasks, as the DAG file names them and the Deliveries page addresses them.
DAG_ID = "cdr_webhook"
SELECT_TASK_ID = "select_cdrs"
POST_TASK_ID = "post_cdr"
#: The owners' alerts: one light task a minute drains their outbox (cdr_webhook.deliver.owner).
OWNER_ALERTS_DAG_ID = "cdr_webhook_owner_alerts"
OWNER_ALERTS_TASK_ID = "alert_owners"


#: Seconds a ``post_cdr`` try may spend on the database (its row, the attempt's record), in its timeout.
DATABASE_ALLOWANCE_SECONDS = 60


#: ``cdrs_per_task`` ``auto`` (0): the run sizes its tasks (:mod:`cdr_webhook.selection.sizing`).
AUTO_SIZED = 0
#: ``max_cdrs_per_run``'s default: with ``cdrs_per_task`` auto, and with a fixed ``cdrs_per_task``.
AUTO_CDRS_PER_RUN = 50_000
FIXED_CDRS_PER_RUN = 500


class SettingsError(ValueError):
    """A ``[cdr_webhook]`` option with a value that cannot be used; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of the pipeline. Parse-time settings shape the DAG; the rest are read by tasks."""

    # Read when the DAG file is parsed (the dag-processor must see these too).
    schedule: str = "* * * * *"  # a 5-field cron expression, or a fixed interval: 30s, 5m, 1h
    retries: int = 6
    retry_delay_seconds: int = 30
    max_retry_delay_seconds: int = 900
    failure_notifier: str | None = None  # "module:attribute" of an Airflow notifier for failed runs
    max_active_posts_per_run: int = 16  # post_cdr tasks of one run in flight (max_active_tis_per_dagrun)
    # Runs at once. No run claims a failing endpoint's CDRs while another waits to retry one
    # (ledger.assignment.assign), so its retries hold one run, not every one: the others keep delivering
    # for everyone else.
    max_active_runs: int = 8
    # 0 (auto): the run sizes its tasks (selection.sizing: a task per CDR up to chunk_above, else a few
    # tasks of any endpoints' CDRs); 1: a post_cdr task per CDR; more: each post_cdr task sends up to
    # this many CDRs of one endpoint.
    cdrs_per_task: int = 0
    # Event-driven pick-up: the triggerer's watcher polls the source twice an interval for new commits
    # and starts a run on them (at most one run start per interval); 0 turns it off (the schedule only).
    watch_interval_seconds: float = 1.0
    # Read by the tasks when they run.
    lag_seconds: int = 60
    # Late commits beyond the lag: a scheduled run queues what its scans missed in the last
    # reconcile_hours (0 disables), at most once every reconcile_interval_seconds, checking a slice of
    # about reconcile_cdrs_per_run CDRs each time (a sweep of the window takes as many as it needs).
    reconcile_hours: int = 24
    reconcile_interval_seconds: int = 60
    reconcile_cdrs_per_run: int = 10_000
    # Finished ledger rows, endpoint events and run records older than this are deleted (0: never).
    retention_days: int = 180
    # The CDRs a run takes from the queue; None: 500 with cdrs_per_task set (a task per CDR, or
    # chunks of that size), 50,000 with auto (a few shared tasks beyond chunk_above).
    max_cdrs_per_run: int | None = None
    chunk_above: int = 16  # auto: a run of up to this many CDRs maps a task per CDR
    request_timeout_seconds: float = 15.0
    source_relation: str = "cdr_webhook_source"
    start_from: dt.datetime | None = None
    claim_timeout_seconds: int = 3600
    unrouted_clients: str = "default"  # clients without their own connection: "default" or "skip"
    allowed_networks: tuple[str, ...] = ()  # CIDRs the egress guard lets through (e.g. 10.0.0.0/8)
    pause_after_failures: int = 50
    pause_after_hours: float = 72.0
    # Every attempt failed, retries included, for this long (about one CDR's whole retry schedule):
    # the endpoint is paused and its owner's alert sent; its CDRs wait queued until it is resumed.
    pause_after_minutes: float = 30.0
    max_in_flight_per_endpoint: int = 8  # POSTs at once to one endpoint; extra max_in_flight overrides
    slot_wait_seconds: int = 60  # how long a POST waits for one of its endpoint's in-flight slots
    # POSTs a second to one endpoint across every task (extra rate_limit_per_second overrides); None: any.
    # Every endpoint's POSTs a second, across workers, tasks and runs, unless its connection's extra
    # rate_limit_per_second says otherwise; None: no limit (deliver.rate paces the sends).
    rate_limit_per_second: float | None = None
    # The Deliveries page: the longest one of its queries may run before the database cancels it.
    page_statement_timeout_seconds: float = 10.0
    # The largest body a CDR may have (256 KiB): a larger one is recorded skipped, with its reason.
    max_payload_bytes: int = 262_144
    # The endpoint's owner (extras owner_email, owner_webhook_url) is told of each pause and resume, and
    # when at least owner_alert_min_attempts attempts in the last owner_alert_window_minutes failed at
    # owner_alert_failure_rate or more (0: never); one alert of a kind per owner_alert_interval_minutes.
    owner_alert_window_minutes: int = 60
    owner_alert_interval_minutes: int = 60
    owner_alert_failure_rate: float = 0.5
    owner_alert_min_attempts: int = 20
    owner_alert_smtp_conn_id: str = "smtp_default"  # Airflow's SMTP connection (host, login, from_email)

    @property
    def auto_sized(self) -> bool:
        """Whether the run sizes its own tasks (``cdrs_per_task`` auto, the default)."""
        return self.cdrs_per_task == AUTO_SIZED

    @property
    def cdrs_per_run(self) -> int:
        """``max_cdrs_per_run``, or its default for the task sizing in use."""
        if self.max_cdrs_per_run is not None:
            return self.max_cdrs_per_run
        return AUTO_CDRS_PER_RUN if self.auto_sized else FIXED_CDRS_PER_RUN

    @property
    def attempt_timeout(self) -> dt.timedelta:
        """
        The ``execution_timeout`` of one ``post_cdr`` try: the slot wait, the POST's deadline, and
        :data:`DATABASE_ALLOWANCE_SECONDS` for reading the row and recording the attempt.
        """
        return dt.timedelta(
            seconds=self.slot_wait_seconds + self.request_timeout_seconds + DATABASE_ALLOWANCE_SECONDS
        )

    @property
    def chunk_timeout(self) -> dt.timedelta:
        """The ``execution_timeout`` of a full chunk of ``cdrs_per_task`` (see :meth:`chunk_timeout_for`)."""
        return self.chunk_timeout_for(self.cdrs_per_task)

    def chunk_timeout_for(self, cdrs: int) -> dt.timedelta:
        """
        The ``execution_timeout`` of one try of a chunk of ``cdrs``: the slot wait, every POST one
        after the other at its deadline (an endpoint with one slot), and the database allowance.
        """
        return dt.timedelta(
            seconds=self.slot_wait_seconds + cdrs * self.request_timeout_seconds + DATABASE_ALLOWANCE_SECONDS
        )

    def validate(self, *, max_map_length: int) -> None:
        """Check the rules that tie settings together; raise :class:`SettingsError` naming the fix."""
        if self.cdrs_per_task == 1 and self.cdrs_per_run >= max_map_length:
            raise SettingsError(
                f"{env_name('max_cdrs_per_run')}={self.cdrs_per_run} must stay below Airflow's "
                f"[core] max_map_length ({max_map_length}): every CDR of a run is one mapped task"
            )
        if not self.auto_sized and -(-self.cdrs_per_run // self.cdrs_per_task) >= max_map_length:
            raise SettingsError(
                f"{env_name('max_cdrs_per_run')}={self.cdrs_per_run} in chunks of "
                f"{env_name('cdrs_per_task')}={self.cdrs_per_task} makes more chunk tasks than Airflow's "
                f"[core] max_map_length ({max_map_length}) allows: raise cdrs_per_task or lower "
                "max_cdrs_per_run"
            )
        if self.retention_days and self.retention_days * 24 <= self.reconcile_hours:
            raise SettingsError(
                f"{env_name('retention_days')}={self.retention_days} must keep the ledger longer than "
                f"reconcile_hours ({self.reconcile_hours} h), or the reconciliation would send pruned "
                "CDRs again"
            )
        # The longest a live run's claim goes untouched: a retry's wait, then a whole try (slot wait,
        # the POST's deadline, database work). Each try refreshes every queued claim of its run.
        horizon = self.max_retry_delay_seconds + self.attempt_timeout.total_seconds()
        if self.claim_timeout_seconds <= horizon:
            raise SettingsError(
                f"{env_name('claim_timeout_seconds')}={self.claim_timeout_seconds} must exceed "
                "max_retry_delay_seconds + slot_wait_seconds + request_timeout_seconds + "
                f"{DATABASE_ALLOWANCE_SECONDS} ({horizon:g}), or a CDR waiting for its next try would be "
                "taken over by another run"
            )


def env_name(name: str) -> str:
    """The environment variable that sets option ``name``: errors name it, so the fix is plain."""
    return f"AIRFLOW__{SECTION.upper()}__{name.upper()}"
