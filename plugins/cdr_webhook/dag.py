"""
### CDR webhook delivery

Every new call detail record (CDR) in the CDR database is POSTed to its customer's webhook endpoint:
one mapped `post_cdr` task per CDR, named by its `cdr_id` in the grid, with Airflow's retries.

* **Scheduled runs** queue the CDRs created since the watermark (minus `lag_seconds`) and send at
  most `max_cdrs_per_run` of the queue, oldest first; the rest go with the next runs.
* **Asset-triggered runs** are started by the commit watcher (in the triggerer) seconds after new
  CDRs are committed; they select exactly like scheduled runs, up to the time they run.
* **Backfill and manual runs** select by a window over `created_at`: the Params `window_start` /
  `window_end`, else the run's data interval, with `policy` `missing` (never sent), `failed` or
  `all` (a deliberate redelivery), optionally for one `client_id`. They never move the watermark.
* **Clearing** a failed `post_cdr` task sends its CDR again, with the same `webhook-id`.
* **Task sizing** (setting `cdrs_per_task`, `auto` by default): a run of up to `chunk_above` (16)
  CDRs sends each as its own task; a bigger run shares one task per free task slot at most, each
  carrying the CDRs of any number of endpoints, each CDR its own POST, named in the grid by its first
  `cdr_id`, its count and its endpoints; a retry or a clear of such a task sends only its CDRs not
  delivered. A number sets a fixed chunk size of one endpoint (1: always a task per CDR).

Delivery state lives in the CDR database, table `cdr_webhook.delivery`. See the project README.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import (
    CronDataIntervalTimetable,
    CronTriggerTimetable,
    DeltaDataIntervalTimetable,
    Param,
    conf,
    dag,
    task,
)

from cdr_webhook.adapters import load_settings
from cdr_webhook.deliver.operator import (
    CDR_NAME_TEMPLATE,
    CHUNK_NAME_TEMPLATE,
    SIZED_NAME_TEMPLATE,
    CdrWebhookOperator,
    RetryAfterPolicy,
)
from cdr_webhook.setting_values import resolve_import_path, schedule_interval
from cdr_webhook.settings import (
    DAG_ID,
    OWNER_ALERTS_DAG_ID,
    OWNER_ALERTS_TASK_ID,
    POST_TASK_ID,
    SELECT_TASK_ID,
)
from cdr_webhook.watch.schedule import watched_schedule
from cdr_webhook.window import POLICIES

settings = load_settings()
interval = schedule_interval(settings.schedule)
notifier = (
    resolve_import_path("failure_notifier", settings.failure_notifier) if settings.failure_notifier else None
)


@dag(
    dag_id=DAG_ID,
    # A plain cron string gives empty data intervals on Airflow 3.3; the scan needs real ones. The
    # commit watcher's asset (when watch_interval_seconds > 0) starts a run sooner, between them.
    schedule=watched_schedule(
        DeltaDataIntervalTimetable(interval)
        if interval
        else CronDataIntervalTimetable(settings.schedule, timezone="UTC"),
        settings,
    ),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    # More than one: a run held up by one endpoint's retries must not stop the runs after it.
    max_active_runs=settings.max_active_runs,
    on_failure_callback=notifier,
    doc_md=__doc__,
    tags=["cdr", "webhook"],
    params={
        "window_start": Param(
            None,
            type=["null", "string"],
            format="date-time",
            title="Window start",
            description="Backfill/manual runs: first created_at included (UTC). Default: data interval.",
        ),
        "window_end": Param(
            None,
            type=["null", "string"],
            format="date-time",
            title="Window end",
            description="Backfill/manual runs: created_at to stop before (excluded). Default: data interval.",
        ),
        "policy": Param(
            "missing",
            type="string",
            enum=list(POLICIES),
            title="Policy",
            description="missing: never sent; failed: the failed ones; all: redeliver the whole window.",
        ),
        "client_id": Param(
            None,
            type=["null", "integer"],
            title="Client",
            description="Only this client's CDRs (account code).",
        ),
    },
)
def cdr_webhook_dag() -> None:
    backoff = {
        "retries": settings.retries,
        "retry_delay": dt.timedelta(seconds=settings.retry_delay_seconds),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": dt.timedelta(seconds=settings.max_retry_delay_seconds),
    }

    # Retried like post_cdr: a try that dies after committing its claims (its worker lost, the
    # api-server or the CDR database away) is tried again and maps exactly those claims, instead of
    # failing the run and leaving them queued for claim_timeout_seconds.
    @task(task_id=SELECT_TASK_ID, **backoff)
    def select_cdrs(cdrs_per_task: int, **context) -> list[dict[str, Any]]:
        """Claim this run's CDRs in the ledger and return what post_cdr is mapped over."""
        from airflow.sdk.exceptions import AirflowFailException

        from cdr_webhook.adapters import endpoint_configs
        from cdr_webhook.db import connect
        from cdr_webhook.selection.source import SourceError
        from cdr_webhook.selection.step import claim_cdrs, run_info
        from cdr_webhook.selection.tasks import worker_cores
        from cdr_webhook.window import InvalidRunRequest

        with connect() as conn:
            try:
                return claim_cdrs(
                    conn,
                    run_info(context),
                    load_settings(),  # run-time settings, read when the task runs
                    connections=endpoint_configs(),
                    cdrs_per_task=cdrs_per_task,
                    max_tasks=conf.getint("core", "max_map_length") - 1,
                    task_slots=min(conf.getint("core", "parallelism"), worker_cores()),
                )
            except (InvalidRunRequest, SourceError) as err:
                # The run's Params or the source view are wrong: no retry can help, the run fails now.
                raise AirflowFailException(str(err)) from err

    retrying = {
        **backoff,
        "retry_policy": RetryAfterPolicy(max_delay_seconds=settings.max_retry_delay_seconds),
        "max_active_tis_per_dagrun": settings.max_active_posts_per_run,
    }
    if settings.auto_sized:
        # Each task's timeout follows its length (the operator sets it): the select step sizes them.
        shape = {"execution_timeout": settings.attempt_timeout, "map_index_template": SIZED_NAME_TEMPLATE}
    elif settings.cdrs_per_task > 1:
        shape = {"execution_timeout": settings.chunk_timeout, "map_index_template": CHUNK_NAME_TEMPLATE}
    else:
        shape = {"execution_timeout": settings.attempt_timeout, "map_index_template": CDR_NAME_TEMPLATE}
    CdrWebhookOperator.partial(
        task_id=POST_TASK_ID,
        # The grouping is the DAG's (read at parse time): the select step groups by it.
        cdrs_per_task=settings.cdrs_per_task,
        **shape,
        **retrying,
    ).expand_kwargs(select_cdrs(cdrs_per_task=settings.cdrs_per_task))


@dag(
    dag_id=OWNER_ALERTS_DAG_ID,
    # One light task a minute, beside the delivery runs rather than in them: the select step is the
    # throughput limiter, and an SMTP server's timeout must never hold a run of CDRs.
    # A timetable, not a plain cron string (whose meaning is a config option): a run at each minute,
    # no data interval to read (the outbox is the work).
    schedule=CronTriggerTimetable("* * * * *", timezone="UTC"),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    # Alerts are owed from the first pause: a paused-at-creation DAG would hold them until someone
    # noticed. Pausing it by hand stops the owners' alerts (they wait in the outbox).
    is_paused_upon_creation=False,
    dagrun_timeout=dt.timedelta(minutes=10),
    on_failure_callback=notifier,
    doc_md="Sends the alerts owed to endpoints' owners (paused, resumed, failing): docs/endpoints.md.",
    tags=["cdr", "webhook"],
)
def owner_alerts_dag() -> None:
    # No Airflow retry: the next minute's run is the retry, and a failed task here says that an
    # alert is still owed (its error is on the Endpoints page too).
    @task(task_id=OWNER_ALERTS_TASK_ID, retries=0, execution_timeout=dt.timedelta(minutes=8))
    def alert_owners() -> dict[str, int]:
        """Send every owner alert due; fail (after sending the others) if one could not be sent."""
        from airflow.sdk.exceptions import AirflowException

        from cdr_webhook.db import connect
        from cdr_webhook.deliver.owner import drain
        from cdr_webhook.ledger.schema import migrate

        with connect() as conn:
            migrate(conn)  # the outbox exists before the first delivery run made it
            done = drain(conn, load_settings())
        if done.failed:
            owed = "; ".join(done.failed[:5])
            raise AirflowException(f"{len(done.failed)} owner alert(s) not sent, tried again later: {owed}")
        return {
            "added": done.added,
            "sent": done.sent,
            "suppressed": done.suppressed,
            "held": done.held,
            "no_contact": done.no_contact,
        }

    alert_owners()
