"""Each ``[cdr_webhook]`` option as Airflow's configuration lists it: its description, type and default.

The package's provider info registers the section (:mod:`cdr_webhook.provider`), so ``airflow config
list`` shows every option; a new setting needs its line in :data:`DESCRIPTIONS` (a test checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdr_webhook import setting_values as values
from cdr_webhook.settings import AUTO_CDRS_PER_RUN, AUTO_SIZED, FIXED_CDRS_PER_RUN, Settings

if TYPE_CHECKING:
    from collections.abc import Callable


# The options as Airflow's configuration lists them: the package's provider info registers the section
# (cdr_webhook.provider), so `airflow config list` and `airflow config get-value cdr_webhook NAME` show
# each option with its default (from Settings above), its type and this description. docs/settings.md
# says more of each.
DESCRIPTIONS: dict[str, str] = {
    "schedule": "When scheduled runs start: a 5-field cron (UTC) or a fixed interval (30s, 5m, 1h).",
    "retries": "Airflow retries of a post_cdr task after a retryable failure, and of select_cdrs.",
    "retry_delay_seconds": "The first retry's delay in seconds; it doubles on each retry.",
    "max_retry_delay_seconds": "The longest retry delay in seconds.",
    "failure_notifier": "module:attribute of an Airflow notifier (or callable) called when a run fails.",
    "lag_seconds": "How far before the watermark each scheduled scan starts again, for late commits.",
    "reconcile_hours": "How far back a scheduled run looks for CDRs committed too late for the lag; 0: off.",
    "reconcile_interval_seconds": "The least time between two reconciliation scans.",
    "reconcile_cdrs_per_run": "About how many CDRs one reconciliation scan checks (a slice of its window).",
    "retention_days": "Finished ledger rows, run records and endpoint events older than this go; 0: kept.",
    "max_cdrs_per_run": (
        f"CDRs one run takes from the queue; unset: {AUTO_CDRS_PER_RUN} with cdrs_per_task auto, "
        f"else {FIXED_CDRS_PER_RUN}."
    ),
    "request_timeout_seconds": "One deadline per POST, from resolving the host to the reply's headers.",
    "source_relation": "The view or table the CDRs are read from, optionally schema-qualified.",
    "start_from": "The first run only: scan from this timestamp (with a UTC offset) instead of its interval.",
    "claim_timeout_seconds": "A queued CDR untouched this long by its run is taken by the next run.",
    "max_active_posts_per_run": "post_cdr tasks of one run at once (max_active_tis_per_dagrun).",
    "unrouted_clients": (
        "Clients without a cdr_webhook_client_<id> connection: default (to cdr_webhook) or skip."
    ),
    "allowed_networks": "Comma-separated CIDRs the egress guard lets through (private addresses, http).",
    "pause_after_failures": "Consecutive failed deliveries that pause an endpoint.",
    "pause_after_hours": "Hours of failure without one success that pause an endpoint.",
    "pause_after_minutes": (
        "Minutes in which every attempt to an endpoint failed, retries included, that pause it and alert."
    ),
    "max_in_flight_per_endpoint": (
        "POSTs at once to one endpoint, across workers (extra max_in_flight overrides it)."
    ),
    "max_active_runs": (
        "Runs of the DAG at once; a failing endpoint's retries hold one run: no other run claims its "
        "CDRs meanwhile."
    ),
    "slot_wait_seconds": "How long a try waits for one of its endpoint's in-flight slots before it yields.",
    "rate_limit_per_second": (
        "POSTs a second to one endpoint, across workers (extra rate_limit_per_second overrides); unset: any."
    ),
    "cdrs_per_task": "auto: the run sizes its post_cdr tasks; 1: a task per CDR; N: chunks of up to N CDRs.",
    "chunk_above": (
        "With cdrs_per_task auto: a run of up to this many CDRs maps a task per CDR; a bigger one shares "
        "a few tasks, each carrying any endpoints' CDRs."
    ),
    "watch_interval_seconds": (
        "The least time between the commit watcher's run starts; it polls twice an interval; 0: off."
    ),
    "page_statement_timeout_seconds": (
        "How long one query of the Deliveries page may run before it is cancelled."
    ),
    "max_payload_bytes": "The largest body a CDR may have; a larger one is recorded skipped with its reason.",
    "owner_alert_window_minutes": "Minutes of attempts the owner's failure-rate alert looks at (5 or more).",
    "owner_alert_interval_minutes": "The least time between two owner alerts of one kind for one endpoint.",
    "owner_alert_failure_rate": "Failed share of the window's attempts that alerts the owner (0-1; 0: off).",
    "owner_alert_min_attempts": "Attempts the window needs before its failure rate alerts the owner.",
    "owner_alert_smtp_conn_id": "Airflow SMTP connection the owners' alert emails go through.",
}

OPTION_TYPES: dict[Callable[[str, str], object], str] = {
    values.non_negative_int: "integer",
    values.positive_int: "integer",
    values.payload_bytes: "integer",
    values.positive_float: "float",
    values.non_negative_float: "float",
    values.rate_limit: "float",
    values.watch_interval: "float",
    values.window_minutes: "integer",
    values.fraction: "float",
}


def default_text(name: str) -> str | None:
    """
    The default of option ``name`` as text its parser accepts (what Airflow's configuration holds), or
    None for an option unset by default.
    """
    value = getattr(Settings(), name)
    if name == "cdrs_per_task" and value == AUTO_SIZED:
        return "auto"
    if value is None or value == ():
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def config_options() -> dict[str, dict[str, Any]]:
    """Every option of ``[cdr_webhook]`` in the form of Airflow's provider info ``config`` section."""
    return {
        name: {
            "description": DESCRIPTIONS[name],
            "version_added": None,
            "type": OPTION_TYPES.get(parse, "string"),
            "example": None,
            "default": default_text(name),
        }
        for name, parse in values.PARSERS.items()
    }
