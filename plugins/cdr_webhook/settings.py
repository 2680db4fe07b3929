"""The ``[cdr_webhook]`` settings: one object, read once, each with a documented default.

Every setting is an Airflow option, so ``AIRFLOW__CDR_WEBHOOK__<NAME>`` sets it. :func:`parse_settings`
is pure (it takes the raw strings); :func:`load_settings` reads them from Airflow's configuration.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import importlib
import re
from typing import TYPE_CHECKING, Any

from cdr_webhook.payload import MIN_PAYLOAD_BYTES
from cdr_webhook.selection.routing import UNROUTED_CHOICES

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

SECTION = "cdr_webhook"

#: Connection ids: the CDR database (Postgres) and the default endpoint (HTTP).
CDR_DB_CONN_ID = "cdr_db"
DEFAULT_ENDPOINT_CONN_ID = "cdr_webhook"

#: The DAG and its tasks, as the DAG file names them and the Deliveries page addresses them.
DAG_ID = "cdr_webhook"
SELECT_TASK_ID = "select_cdrs"
POST_TASK_ID = "post_cdr"


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
    max_active_runs: int = 4  # runs at once: a run held up by one endpoint's retries blocks no other
    # 0 (auto): the run sizes its tasks (selection.sizing); 1: a post_cdr task per CDR; more: each
    # post_cdr task sends up to this many CDRs of one endpoint.
    cdrs_per_task: int = 0
    # Event-driven pick-up: the triggerer's watcher polls the source this often for new commits and
    # starts a run on them (at most one run start per interval); 0 turns it off (the schedule only).
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
    # chunks of that size), 50,000 with auto (chunked beyond chunk_above per endpoint).
    max_cdrs_per_run: int | None = None
    chunk_above: int = 16  # auto: up to this many CDRs of an endpoint in a run go a task each
    request_timeout_seconds: float = 15.0
    source_relation: str = "cdr_webhook_source"
    start_from: dt.datetime | None = None
    claim_timeout_seconds: int = 3600
    unrouted_clients: str = "default"  # clients without their own connection: "default" or "skip"
    allowed_networks: tuple[str, ...] = ()  # CIDRs the egress guard lets through (e.g. 10.0.0.0/8)
    pause_after_failures: int = 50
    pause_after_hours: float = 72.0
    max_in_flight_per_endpoint: int = 8  # POSTs at once to one endpoint; extra max_in_flight overrides
    slot_wait_seconds: int = 60  # how long a POST waits for one of its endpoint's in-flight slots
    # The Deliveries page: the longest one of its queries may run before the database cancels it.
    page_statement_timeout_seconds: float = 10.0
    # The largest body a CDR may have (256 KiB): a larger one is recorded skipped, with its reason.
    max_payload_bytes: int = 262_144

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
                f"{_env('max_cdrs_per_run')}={self.cdrs_per_run} must stay below Airflow's "
                f"[core] max_map_length ({max_map_length}): every CDR of a run is one mapped task"
            )
        if not self.auto_sized and -(-self.cdrs_per_run // self.cdrs_per_task) >= max_map_length:
            raise SettingsError(
                f"{_env('max_cdrs_per_run')}={self.cdrs_per_run} in chunks of "
                f"{_env('cdrs_per_task')}={self.cdrs_per_task} makes more chunk tasks than Airflow's "
                f"[core] max_map_length ({max_map_length}) allows: raise cdrs_per_task or lower "
                "max_cdrs_per_run"
            )
        if self.retention_days and self.retention_days * 24 <= self.reconcile_hours:
            raise SettingsError(
                f"{_env('retention_days')}={self.retention_days} must keep the ledger longer than "
                f"reconcile_hours ({self.reconcile_hours} h), or the reconciliation would send pruned "
                "CDRs again"
            )
        # The longest a live run's claim goes untouched: a retry's wait, then a whole try (slot wait,
        # the POST's deadline, database work). Each try refreshes every queued claim of its run.
        horizon = self.max_retry_delay_seconds + self.attempt_timeout.total_seconds()
        if self.claim_timeout_seconds <= horizon:
            raise SettingsError(
                f"{_env('claim_timeout_seconds')}={self.claim_timeout_seconds} must exceed "
                "max_retry_delay_seconds + slot_wait_seconds + request_timeout_seconds + "
                f"{DATABASE_ALLOWANCE_SECONDS} ({horizon:g}), or a CDR waiting for its next try would be "
                "taken over by another run"
            )


def _env(name: str) -> str:
    return f"AIRFLOW__{SECTION.upper()}__{name.upper()}"


def _whole_number(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{_env(name)}={raw!r} is not a whole number") from None
    if value < minimum:
        raise SettingsError(f"{_env(name)}={raw!r} must be at least {minimum}")
    return value


def _positive_int(name: str, raw: str) -> int:
    return _whole_number(name, raw, 1)


def _non_negative_int(name: str, raw: str) -> int:
    return _whole_number(name, raw, 0)


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{_env(name)}={raw!r} is not a number") from None
    if not value > 0:
        raise SettingsError(f"{_env(name)}={raw!r} must be greater than 0")
    return value


def _non_negative_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{_env(name)}={raw!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise SettingsError(f"{_env(name)}={raw!r} must be 0 (off) or a number of seconds")
    return value


def _cdrs_per_task(name: str, raw: str) -> int:
    if raw.strip().lower() == "auto":
        return AUTO_SIZED
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{_env(name)}={raw!r} must be auto or a whole number of CDRs") from None
    if value < 1:
        raise SettingsError(f"{_env(name)}={raw!r} must be auto or at least 1")
    return value


def _payload_bytes(name: str, raw: str) -> int:
    # Every body carries the 19 fields: below this, nearly every CDR would be skipped.
    return _whole_number(name, raw, MIN_PAYLOAD_BYTES)


def _watch_interval(name: str, raw: str) -> float:
    value = _non_negative_float(name, raw)
    if 0 < value < 0.1:
        # Each poll is two queries on the CDR database; Airflow's own start of a run takes far longer.
        raise SettingsError(f"{_env(name)}={raw!r} must be 0 (off) or at least 0.1")
    return value


def _relation(name: str, raw: str) -> str:
    parts = raw.split(".")
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise SettingsError(f"{_env(name)}={raw!r} must be a relation name, optionally schema-qualified")
    return raw


def _timestamp(name: str, raw: str) -> dt.datetime | None:
    if not raw.strip():
        return None
    try:
        value = dt.datetime.fromisoformat(raw.strip())
    except ValueError:
        raise SettingsError(f"{_env(name)}={raw!r} is not an ISO 8601 timestamp") from None
    if value.tzinfo is None:
        raise SettingsError(f"{_env(name)}={raw!r} needs a UTC offset, e.g. 2026-01-01T00:00:00+00:00")
    return value


_INTERVAL = re.compile(r"^\s*(\d+)\s*([smh])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def schedule_interval(schedule: str) -> dt.timedelta | None:
    """Return the fixed interval of a schedule such as ``30s`` or ``5m``; None for a cron expression."""
    match = _INTERVAL.match(schedule)
    if match is None:
        return None
    return dt.timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def _schedule(name: str, raw: str) -> str:
    interval = schedule_interval(raw)
    if interval is not None:
        if interval < dt.timedelta(seconds=5):
            raise SettingsError(f"{_env(name)}={raw!r}: an interval schedule must be at least 5s")
        return raw.strip()
    from croniter import croniter  # Airflow's own cron parser; imported only when a schedule is read

    if len(raw.split()) != 5 or not croniter.is_valid(raw):
        raise SettingsError(
            f"{_env(name)}={raw!r} is neither a 5-field cron expression nor an interval such as 30s or 5m"
        )
    return raw


def _import_path(name: str, raw: str) -> str | None:
    if not raw.strip():
        return None
    module, _, attribute = raw.strip().partition(":")
    if not module or not attribute:
        raise SettingsError(f"{_env(name)}={raw!r} must be 'module:attribute', e.g. cdr_alerts:notifier")
    return raw.strip()


def resolve_import_path(name: str, path: str) -> Any:
    """Import the object a ``module:attribute`` setting names; the error names the setting."""
    module_name, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise SettingsError(f"{_env(name)}={path!r} cannot be imported: {err}") from err


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw.strip() not in choices:
            raise SettingsError(f"{_env(name)}={raw!r} must be one of: {', '.join(choices)}")
        return raw.strip()

    return parse


def _networks(name: str, raw: str) -> tuple[str, ...]:
    from cdr_webhook.deliver.egress import parse_networks  # the egress guard's own parser, one rule for both

    try:
        return tuple(str(network) for network in parse_networks(raw))
    except ValueError as err:
        raise SettingsError(str(err)) from None


_PARSERS: dict[str, Callable[[str, str], object]] = {
    "schedule": _schedule,
    "retries": _non_negative_int,
    "retry_delay_seconds": _positive_int,
    "max_retry_delay_seconds": _positive_int,
    "failure_notifier": _import_path,
    "lag_seconds": _non_negative_int,
    "reconcile_hours": _non_negative_int,
    "reconcile_interval_seconds": _positive_int,
    "reconcile_cdrs_per_run": _positive_int,
    "retention_days": _non_negative_int,
    "max_cdrs_per_run": _positive_int,
    "request_timeout_seconds": _positive_float,
    "source_relation": _relation,
    "start_from": _timestamp,
    "claim_timeout_seconds": _positive_int,
    "max_active_posts_per_run": _positive_int,
    "unrouted_clients": _choice(*UNROUTED_CHOICES),
    "allowed_networks": _networks,
    "pause_after_failures": _positive_int,
    "pause_after_hours": _positive_float,
    "max_in_flight_per_endpoint": _positive_int,
    "max_active_runs": _positive_int,
    "slot_wait_seconds": _non_negative_int,
    "cdrs_per_task": _cdrs_per_task,
    "chunk_above": _positive_int,
    "watch_interval_seconds": _watch_interval,
    "page_statement_timeout_seconds": _positive_float,
    "max_payload_bytes": _payload_bytes,
}


def parse_settings(raw: Mapping[str, str], *, max_map_length: int = 1024) -> Settings:
    """Build and validate :class:`Settings` from option strings; absent options keep their defaults."""
    values = {name: _PARSERS[name](name, text) for name, text in raw.items() if name in _PARSERS}
    settings = Settings(**values)  # type: ignore[arg-type]
    settings.validate(max_map_length=max_map_length)
    return settings


@functools.cache
def load_settings() -> Settings:
    """Read ``[cdr_webhook]`` from Airflow's configuration (file or environment), once per process."""
    from airflow.sdk import conf

    raw = {}
    for name in _PARSERS:
        value = conf.get(SECTION, name, fallback=None)
        if value is not None:
            raw[name] = value
    return parse_settings(raw, max_map_length=conf.getint("core", "max_map_length", fallback=1024))
