"""The select step's upkeep after its claims commit: retention's pruning and the backlog charts' snapshot."""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from cdr_webhook import ledger
from cdr_webhook.ledger import backlog, endpoints, health

if TYPE_CHECKING:
    import psycopg

    from cdr_webhook.settings import Settings

log = logging.getLogger(__name__)


def prune(conn: psycopg.Connection[Any], settings: Settings, now: dt.datetime) -> None:
    """Delete what is older than ``retention_days`` (a bounded batch per run), outside the claims."""
    if not settings.retention_days:
        return
    before = now - dt.timedelta(days=settings.retention_days)
    rows = ledger.prune(conn, before=before)
    events = endpoints.prune_events(conn, before=before)
    if rows or events:
        log.info(
            "Retention (%d days): deleted %d finished ledger row(s) and %d endpoint event(s) before %s",
            settings.retention_days,
            rows,
            events,
            before.isoformat(),
        )


def snapshot_backlog(conn: psycopg.Connection[Any], now: dt.datetime) -> None:
    """Each endpoint's backlog for its chart, once per 5 minutes; a failure costs a point, not the run."""
    try:
        backlog.snapshot_backlog(conn, now=now)
    except Exception as err:  # noqa: BLE001 - the run's CDRs are claimed: they go out all the same
        log.warning(
            "The backlog snapshot of %s is not written (the endpoints' backlog charts miss it, the next "
            "run tries again): %s: %s",
            health.bucket_of(now.timestamp()).isoformat(),
            type(err).__name__,
            err,
        )
