"""Versioned migrations of schema ``cdr_webhook`` (the ledger, the watermark, the endpoint state).

:func:`migrate` brings any install up to date: a fresh database, one made by a release before
versioning (its tables match step 1 exactly, with no version table) or one a few steps behind.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

#: The key the ledger's DDL was serialised on before versioning: an older release starting at the same
#: time as this one waits for the migration instead of racing it.
_LOCK_KEY = 0x0CD2_3EB0


@dataclasses.dataclass(frozen=True)
class Step:
    """One schema change; applied once, in order, and recorded in ``cdr_webhook.schema_version``."""

    version: int
    name: str
    ddl: str


# Step 1 is the DDL of the releases before versioning, verbatim (ledger, then endpoints): every
# statement is IF NOT EXISTS, so an install made by them passes through it unchanged.
_LEDGER_V1 = """
CREATE SCHEMA IF NOT EXISTS cdr_webhook;

CREATE TABLE IF NOT EXISTS cdr_webhook.delivery (
    cdr_id           text        NOT NULL,
    endpoint         text        NOT NULL,
    client_id        bigint,
    cdr_created_at   timestamptz NOT NULL,
    status           text        NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'delivered', 'failed', 'skipped')),
    attempts         integer     NOT NULL DEFAULT 0,
    http_status      integer,
    error            text,
    response_excerpt text        CHECK (octet_length(response_excerpt) <= 2048),
    latency_ms       integer,
    dag_id           text,
    run_id           text,
    map_index        integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    claimed_at       timestamptz,
    last_attempt_at  timestamptz,
    delivered_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cdr_id, endpoint)
);
CREATE INDEX IF NOT EXISTS delivery_queued_idx
    ON cdr_webhook.delivery (cdr_created_at, cdr_id) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS delivery_cdr_created_at_idx ON cdr_webhook.delivery (cdr_created_at);
CREATE INDEX IF NOT EXISTS delivery_run_idx ON cdr_webhook.delivery (dag_id, run_id);

-- What each run asked for when it claimed: a cleared run that asks again for the same thing gets
-- its own claims back; a run cleared with new Params (a reprocessing backfill) selects anew.
CREATE TABLE IF NOT EXISTS cdr_webhook.run_selection (
    dag_id      text        NOT NULL,
    run_id      text        NOT NULL,
    request     jsonb       NOT NULL,
    selected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dag_id, run_id)
);

CREATE TABLE IF NOT EXISTS cdr_webhook.watermark (
    source_relation text        PRIMARY KEY,
    created_at      timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
"""

_ENDPOINTS_V1 = """
CREATE SCHEMA IF NOT EXISTS cdr_webhook;

CREATE TABLE IF NOT EXISTS cdr_webhook.endpoint_state (
    endpoint             text        PRIMARY KEY,
    paused               boolean     NOT NULL DEFAULT false,
    reason               text,
    changed_by           text,
    changed_at           timestamptz,
    consecutive_failures integer     NOT NULL DEFAULT 0,
    failing_since        timestamptz,
    last_success_at      timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS cdr_webhook.endpoint_event (
    id       bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint text        NOT NULL,
    action   text        NOT NULL CHECK (action IN ('paused', 'resumed')),
    reason   text,
    actor    text        NOT NULL,
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS endpoint_event_endpoint_idx ON cdr_webhook.endpoint_event (endpoint, at);
"""

STEPS: tuple[Step, ...] = (
    Step(1, "ledger, watermark and endpoint tables", _LEDGER_V1 + _ENDPOINTS_V1),
    Step(
        2,
        "queued rows by endpoint, for round-robin assignment",
        "CREATE INDEX IF NOT EXISTS delivery_queued_endpoint_idx "
        "ON cdr_webhook.delivery (endpoint, cdr_created_at, cdr_id) WHERE status = 'queued'",
    ),
    Step(
        3,
        "reconciliation bookkeeping on the watermark",
        # scanned_from is where the scans began: reconciliation never reaches before it (history is
        # a backfill's job). An install from before this step has scanned up to its watermark.
        "ALTER TABLE cdr_webhook.watermark ADD COLUMN IF NOT EXISTS scanned_from timestamptz; "
        "ALTER TABLE cdr_webhook.watermark ADD COLUMN IF NOT EXISTS reconciled_at timestamptz; "
        "UPDATE cdr_webhook.watermark SET scanned_from = created_at WHERE scanned_from IS NULL",
    ),
    Step(
        4,
        "failed attempts per endpoint",
        "ALTER TABLE cdr_webhook.endpoint_state "
        "ADD COLUMN IF NOT EXISTS failed_attempts integer NOT NULL DEFAULT 0",
    ),
    Step(
        5,
        "ledger rows by endpoint and status, for the endpoint list",
        # The distinct endpoints of the whole ledger (one index probe each) and their failed counts,
        # instead of a scan of every row. Status updates are not HOT already (partial indexes).
        "CREATE INDEX IF NOT EXISTS delivery_endpoint_status_idx ON cdr_webhook.delivery (endpoint, status)",
    ),
)

LATEST = STEPS[-1].version

_VERSION_TABLE = """
CREATE SCHEMA IF NOT EXISTS cdr_webhook;
CREATE TABLE IF NOT EXISTS cdr_webhook.schema_version (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


def current_version(conn: psycopg.Connection[Any]) -> int:
    """Return the last applied step (0: no version table yet, a fresh or pre-versioning install)."""
    row = conn.execute("SELECT to_regclass('cdr_webhook.schema_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT COALESCE(max(version), 0) FROM cdr_webhook.schema_version").fetchone()
    return row[0] if row else 0


def migrate(conn: psycopg.Connection[Any]) -> int:
    """
    Apply every step not yet applied, in one transaction; return the schema version now.

    Safe to run concurrently (an advisory lock serialises it; who waits finds the work done) and
    cheap when nothing is due: every run's select step calls it, and takes no lock then.
    """
    if current_version(conn) == LATEST:
        return LATEST
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(_VERSION_TABLE)
        version = current_version(conn)
        for step in STEPS:
            if step.version <= version:
                continue
            conn.execute(step.ddl)
            conn.execute(
                "INSERT INTO cdr_webhook.schema_version (version, name) VALUES (%s, %s)",
                (step.version, step.name),
            )
            log.info("Schema cdr_webhook: applied step %d (%s)", step.version, step.name)
            version = step.version
    return version
