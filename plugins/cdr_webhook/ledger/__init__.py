"""The delivery ledger, in schema ``cdr_webhook`` of the CDR database: one row per (CDR, endpoint).

A row is both the outbox and the record. Its life, one module per stage:

* :mod:`~cdr_webhook.ledger.watermark`: how far scheduled scans have read the source, and the
  reconciliation's sweep behind them;
* :mod:`~cdr_webhook.ledger.keys`: the keys of source rows without a usable cdr_id;
* :mod:`~cdr_webhook.ledger.queue`: new CDRs entered as ``queued`` (and finished ones again);
* :mod:`~cdr_webhook.ledger.assignment`: a run's fair share of the queue;
* :mod:`~cdr_webhook.ledger.claims`: which run and task own a row, and the start of each attempt;
* :mod:`~cdr_webhook.ledger.records`: what each attempt produced (and the attempt history);
* :mod:`~cdr_webhook.ledger.retention`: finished rows deleted after ``retention_days``;
* :mod:`~cdr_webhook.ledger.endpoints`: each endpoint's state (paused, why, its failure streak);
* :mod:`~cdr_webhook.ledger.pause_rules`: the automatic pause, from each endpoint's counted outcomes;
* :mod:`~cdr_webhook.ledger.events`: an endpoint's test CDRs and last events;
* :mod:`~cdr_webhook.ledger.health`: each endpoint's attempts per 5 minutes, for its charts;
* :mod:`~cdr_webhook.ledger.owner_alerts`: the alerts owed to each endpoint's owner (an outbox);
* :mod:`~cdr_webhook.ledger.schema`: the tables, made and upgraded by numbered steps.

The names below are the ledger's API, used as ``ledger.assign(...)``, ``ledger.Claim``.
"""

from __future__ import annotations

from cdr_webhook.ledger.assignment import assign, queued_backlog
from cdr_webhook.ledger.claims import (
    Claim,
    NotStarted,
    keep_claims_alive,
    owned_claims,
    record_request,
    recorded_request,
    release_many,
    start_attempts,
)
from cdr_webhook.ledger.keys import LONG_CDR_ID_PREFIX, MAX_CDR_ID_LENGTH, NULL_CDR_ID_PREFIX
from cdr_webhook.ledger.queue import enqueue_new, finished_endpoints, late_clients, requeue
from cdr_webhook.ledger.records import (
    mark_skipped,
    mark_skipped_many,
    record_attempts,
)
from cdr_webhook.ledger.retention import Pruned, prune, pruned
from cdr_webhook.ledger.watermark import (
    advance_watermark,
    due_reconciliation,
    lock_watermark,
    note_scan_start,
    reconcile_slice,
)

__all__ = [
    "LONG_CDR_ID_PREFIX",
    "MAX_CDR_ID_LENGTH",
    "NULL_CDR_ID_PREFIX",
    "Claim",
    "NotStarted",
    "Pruned",
    "advance_watermark",
    "assign",
    "due_reconciliation",
    "enqueue_new",
    "finished_endpoints",
    "keep_claims_alive",
    "late_clients",
    "lock_watermark",
    "mark_skipped",
    "mark_skipped_many",
    "note_scan_start",
    "owned_claims",
    "prune",
    "pruned",
    "queued_backlog",
    "reconcile_slice",
    "record_attempts",
    "record_request",
    "recorded_request",
    "release_many",
    "requeue",
    "start_attempts",
]
