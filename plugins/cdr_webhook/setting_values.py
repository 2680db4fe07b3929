"""How each ``[cdr_webhook]`` option is read from its text: a parser per option (each error names the
``AIRFLOW__CDR_WEBHOOK__<NAME>`` variable and the rule), :func:`parse_settings` over them all, and the
readings other modules share: SQL relation names, schedules, import paths. Pure.
"""

from __future__ import annotations

import datetime as dt
import importlib
import re
from typing import TYPE_CHECKING, Any

from cdr_webhook.networks import parse_networks  # the egress guard's own parser, one rule for both
from cdr_webhook.pacing import MAX_RATE
from cdr_webhook.payload import MIN_PAYLOAD_BYTES
from cdr_webhook.routing import UNROUTED_CHOICES
from cdr_webhook.settings import AUTO_SIZED, Settings, SettingsError, env_name

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


def whole_number(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{env_name(name)}={raw!r} is not a whole number") from None
    if value < minimum:
        raise SettingsError(f"{env_name(name)}={raw!r} must be at least {minimum}")
    return value


def positive_int(name: str, raw: str) -> int:
    return whole_number(name, raw, 1)


def non_negative_int(name: str, raw: str) -> int:
    return whole_number(name, raw, 0)


def positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{env_name(name)}={raw!r} is not a number") from None
    if not value > 0:
        raise SettingsError(f"{env_name(name)}={raw!r} must be greater than 0")
    return value


def non_negative_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{env_name(name)}={raw!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise SettingsError(f"{env_name(name)}={raw!r} must be 0 (off) or a number of seconds")
    return value


def rate_limit(name: str, raw: str) -> float | None:
    if not raw.strip():
        return None  # unset: no limit
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{env_name(name)}={raw!r} is not a number") from None
    if not 0 < value <= MAX_RATE:  # NaN too
        raise SettingsError(
            f"{env_name(name)}={raw!r} must be a number of POSTs a second, above 0 and at most {MAX_RATE}"
        )
    return value


def window_minutes(name: str, raw: str) -> int:
    return whole_number(name, raw, 5)  # the health rollup's buckets are 5 minutes


def fraction(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{env_name(name)}={raw!r} is not a number") from None
    if not 0 <= value <= 1:
        raise SettingsError(f"{env_name(name)}={raw!r} must be a fraction from 0 (off) to 1, e.g. 0.5")
    return value


def conn_id(name: str, raw: str) -> str:
    if not raw.strip() or len(raw.strip()) > 250:
        raise SettingsError(f"{env_name(name)}={raw!r} must be an Airflow connection id")
    return raw.strip()


def cdrs_per_task(name: str, raw: str) -> int:
    if raw.strip().lower() == "auto":
        return AUTO_SIZED
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{env_name(name)}={raw!r} must be auto or a whole number of CDRs") from None
    if value < 1:
        raise SettingsError(f"{env_name(name)}={raw!r} must be auto or at least 1")
    return value


def payload_bytes(name: str, raw: str) -> int:
    # Every body carries the 19 fields: below this, nearly every CDR would be skipped.
    return whole_number(name, raw, MIN_PAYLOAD_BYTES)


def watch_interval(name: str, raw: str) -> float:
    value = non_negative_float(name, raw)
    if 0 < value < 0.1:
        # Each poll is two queries on the CDR database; Airflow's own start of a run takes far longer.
        raise SettingsError(f"{env_name(name)}={raw!r} must be 0 (off) or at least 0.1")
    return value


def relation_parts(relation: str) -> tuple[str, ...]:
    """
    The parts of a (possibly schema-qualified) relation name, read as PostgreSQL reads one in SQL and in
    ``to_regclass``: an unquoted part folds to lower case (``Public.Mixed`` is ``public.mixed``), a
    double-quoted one keeps its case and its dots (``"Public"."Mixed"``). ValueError when it is no name.
    """
    parts: list[str] = []
    rest = relation.strip()
    while True:
        if rest.startswith('"'):
            end, part = 1, ""
            while True:
                quote = rest.find('"', end)
                if quote < 0:
                    raise ValueError(f"{relation!r} has an unclosed double quote")
                part += rest[end:quote]
                if rest[quote + 1 : quote + 2] != '"':
                    break
                part, end = part + '"', quote + 2  # "" is a double quote inside a quoted name
            rest = rest[quote + 1 :].lstrip()
        else:
            cut = rest.find(".") if "." in rest else len(rest)
            part, rest = rest[:cut].rstrip(), rest[cut:]
            if '"' in part or any(c.isspace() for c in part):
                raise ValueError(f"{relation!r} is not a relation name")
            # PostgreSQL folds only ASCII letters of an unquoted name (in a UTF-8 database).
            part = part.translate(_ASCII_LOWER)
        if not part:
            raise ValueError(f"{relation!r} has an empty part")
        parts.append(part)
        if not rest:
            return tuple(parts)
        if not rest.startswith("."):
            raise ValueError(f"{relation!r} is not a relation name")
        rest = rest[1:].lstrip()


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def relation(name: str, raw: str) -> str:
    try:
        parts = relation_parts(raw)
    except ValueError as err:
        raise SettingsError(f"{env_name(name)}={raw!r} must be a relation name: {err}") from None
    if len(parts) > 2:
        raise SettingsError(f"{env_name(name)}={raw!r} must be a relation name, optionally schema-qualified")
    return raw


def timestamp(name: str, raw: str) -> dt.datetime | None:
    if not raw.strip():
        return None
    try:
        value = dt.datetime.fromisoformat(raw.strip())
    except ValueError:
        raise SettingsError(f"{env_name(name)}={raw!r} is not an ISO 8601 timestamp") from None
    if value.tzinfo is None:
        raise SettingsError(f"{env_name(name)}={raw!r} needs a UTC offset, e.g. 2026-01-01T00:00:00+00:00")
    return value


_INTERVAL = re.compile(r"^\s*(\d+)\s*([smh])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def schedule_interval(schedule: str) -> dt.timedelta | None:
    """Return the fixed interval of a schedule such as ``30s`` or ``5m``; None for a cron expression."""
    match = _INTERVAL.match(schedule)
    if match is None:
        return None
    return dt.timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def schedule(name: str, raw: str) -> str:
    interval = schedule_interval(raw)
    if interval is not None:
        if interval < dt.timedelta(seconds=5):
            raise SettingsError(f"{env_name(name)}={raw!r}: an interval schedule must be at least 5s")
        return raw.strip()
    from croniter import croniter  # Airflow's own cron parser; imported only when a schedule is read

    if len(raw.split()) != 5 or not croniter.is_valid(raw):
        raise SettingsError(
            f"{env_name(name)}={raw!r} is neither a 5-field cron expression nor an interval such as 30s or 5m"
        )
    return raw


def import_path(name: str, raw: str) -> str | None:
    if not raw.strip():
        return None
    module, _, attribute = raw.strip().partition(":")
    if not module or not attribute:
        raise SettingsError(f"{env_name(name)}={raw!r} must be 'module:attribute', e.g. cdr_alerts:notifier")
    return raw.strip()


def resolve_import_path(name: str, path: str) -> Any:
    """Import the object a ``module:attribute`` setting names; the error names the setting."""
    module_name, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise SettingsError(f"{env_name(name)}={path!r} cannot be imported: {err}") from err


def choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw.strip() not in choices:
            raise SettingsError(f"{env_name(name)}={raw!r} must be one of: {', '.join(choices)}")
        return raw.strip()

    return parse


def networks(name: str, raw: str) -> tuple[str, ...]:
    try:
        return tuple(str(network) for network in parse_networks(raw))
    except ValueError as err:
        raise SettingsError(str(err)) from None


PARSERS: dict[str, Callable[[str, str], object]] = {
    "schedule": schedule,
    "retries": non_negative_int,
    "retry_delay_seconds": positive_int,
    "max_retry_delay_seconds": positive_int,
    "failure_notifier": import_path,
    "lag_seconds": non_negative_int,
    "reconcile_hours": non_negative_int,
    "reconcile_interval_seconds": positive_int,
    "reconcile_cdrs_per_run": positive_int,
    "retention_days": non_negative_int,
    "max_cdrs_per_run": positive_int,
    "request_timeout_seconds": positive_float,
    "source_relation": relation,
    "start_from": timestamp,
    "claim_timeout_seconds": positive_int,
    "max_active_posts_per_run": positive_int,
    "unrouted_clients": choice(*UNROUTED_CHOICES),
    "allowed_networks": networks,
    "pause_after_failures": positive_int,
    "pause_after_hours": positive_float,
    "pause_after_minutes": positive_float,
    "max_in_flight_per_endpoint": positive_int,
    "max_active_runs": positive_int,
    "slot_wait_seconds": non_negative_int,
    "rate_limit_per_second": rate_limit,
    "cdrs_per_task": cdrs_per_task,
    "chunk_above": positive_int,
    "watch_interval_seconds": watch_interval,
    "page_statement_timeout_seconds": positive_float,
    "max_payload_bytes": payload_bytes,
    "owner_alert_window_minutes": window_minutes,
    "owner_alert_interval_minutes": positive_int,
    "owner_alert_failure_rate": fraction,
    "owner_alert_min_attempts": positive_int,
    "owner_alert_smtp_conn_id": conn_id,
}
#: The options :func:`cdr_webhook.adapters.load_settings` reads from Airflow's configuration.
OPTION_NAMES = tuple(PARSERS)


def parse_settings(raw: Mapping[str, str], *, max_map_length: int = 1024) -> Settings:
    """Build and validate :class:`Settings` from option strings; absent options keep their defaults."""
    values = {name: PARSERS[name](name, text) for name, text in raw.items() if name in PARSERS}
    settings = Settings(**values)  # type: ignore[arg-type]
    settings.validate(max_map_length=max_map_length)
    return settings
