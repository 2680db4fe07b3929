"""Versioned migrations of schema ``cdr_webhook`` (the ledger, the watermark, the endpoint state).

:func:`migrate` brings any install up to date: a fresh database, one made by a release before
versioning (its tables match step 1 exactly, with no version table) or one a few steps behind.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from cdr_webhook.ledger import owner_alerts

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

# Step 6: one row per attempt (the ledger row keeps only the last), written by a trigger so that every
# path that counts an attempt (one CDR per task, or many in one statement) records it; and the
# indexes the Deliveries page lists by, newest first, with keyset pagination.
_ATTEMPTS_V6 = """
CREATE TABLE IF NOT EXISTS cdr_webhook.delivery_attempt (
    cdr_id           text        NOT NULL,
    endpoint         text        NOT NULL,
    attempt          integer     NOT NULL,
    status           text        NOT NULL,
    http_status      integer,
    error            text,
    response_excerpt text,
    latency_ms       integer,
    dag_id           text,
    run_id           text,
    map_index        integer,
    at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cdr_id, endpoint, attempt),
    FOREIGN KEY (cdr_id, endpoint) REFERENCES cdr_webhook.delivery (cdr_id, endpoint) ON DELETE CASCADE
);

CREATE OR REPLACE FUNCTION cdr_webhook.record_delivery_attempt() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- A second record of the same attempt number (a row re-inserted after retention) replaces it.
    INSERT INTO cdr_webhook.delivery_attempt (cdr_id, endpoint, attempt, status, http_status, error,
        response_excerpt, latency_ms, dag_id, run_id, map_index, at)
    VALUES (NEW.cdr_id, NEW.endpoint, NEW.attempts, NEW.status, NEW.http_status, NEW.error,
        NEW.response_excerpt, NEW.latency_ms, NEW.dag_id, NEW.run_id, NEW.map_index,
        COALESCE(NEW.last_attempt_at, now()))
    ON CONFLICT (cdr_id, endpoint, attempt) DO UPDATE SET status = EXCLUDED.status,
        http_status = EXCLUDED.http_status, error = EXCLUDED.error,
        response_excerpt = EXCLUDED.response_excerpt, latency_ms = EXCLUDED.latency_ms,
        dag_id = EXCLUDED.dag_id, run_id = EXCLUDED.run_id, map_index = EXCLUDED.map_index, at = EXCLUDED.at;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS delivery_attempt_recorded ON cdr_webhook.delivery;
CREATE TRIGGER delivery_attempt_recorded AFTER UPDATE OF attempts ON cdr_webhook.delivery
    FOR EACH ROW WHEN (NEW.attempts > OLD.attempts)
    EXECUTE FUNCTION cdr_webhook.record_delivery_attempt();

-- The page lists newest first by (cdr_created_at, cdr_id, endpoint); each filter has an index in
-- that order, so a page is one index range read, however deep (keyset, never OFFSET). Unfiltered
-- and delivered-only lists read delivery_cdr_created_at_idx; the rarer statuses their own index.
CREATE INDEX IF NOT EXISTS delivery_client_list_idx
    ON cdr_webhook.delivery (client_id, cdr_created_at, cdr_id);
CREATE INDEX IF NOT EXISTS delivery_endpoint_list_idx
    ON cdr_webhook.delivery (endpoint, cdr_created_at, cdr_id);
CREATE INDEX IF NOT EXISTS delivery_status_list_idx
    ON cdr_webhook.delivery (status, cdr_created_at, cdr_id) WHERE status <> 'delivered';
"""

# Step 8: what the commit watcher (cdr_webhook.watch) has seen and fired for, per source relation, so
# a restarted watcher resumes from the database, not from memory: started_from is the newest created_at
# when it first started without a watermark (older rows are history, a backfill's job), fired_through
# the newest created_at it fired a run for, fired_at when; more_at is when a run last took a full
# max_cdrs_per_run and left CDRs queued (the watcher starts another run for them).
_WATCH_V8 = """
CREATE TABLE IF NOT EXISTS cdr_webhook.watch_state (
    source_relation text        PRIMARY KEY,
    started_from    timestamptz,
    fired_through   timestamptz,
    fired_at        timestamptz,
    fires           bigint      NOT NULL DEFAULT 0,
    more_at         timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
"""

# Step 11: a test CDR sent by hand (issue #25) is an endpoint event, never a delivery: its verdict in
# reason, and what the receiver answered (status, time taken, a bounded and scrubbed excerpt).
_TESTS_V11 = """
ALTER TABLE cdr_webhook.endpoint_event DROP CONSTRAINT IF EXISTS endpoint_event_action_check;
ALTER TABLE cdr_webhook.endpoint_event ADD CONSTRAINT endpoint_event_action_check
    CHECK (action IN ('paused', 'resumed', 'tested'));
ALTER TABLE cdr_webhook.endpoint_event ADD COLUMN IF NOT EXISTS cdr_id text;
ALTER TABLE cdr_webhook.endpoint_event ADD COLUMN IF NOT EXISTS http_status integer;
ALTER TABLE cdr_webhook.endpoint_event ADD COLUMN IF NOT EXISTS latency_ms integer;
ALTER TABLE cdr_webhook.endpoint_event ADD COLUMN IF NOT EXISTS response_excerpt text
    CHECK (octet_length(response_excerpt) <= 2048);
"""

# Step 12: each endpoint's health per 5 minutes (cdr_webhook.ledger.health), written by record_attempts in
# its transaction, so the charts read a few thousand rows, never the ledger. The histograms' bins are
# health.EDGES_MS; histogram_add adds two of them bin by bin (a row's upsert).
_HEALTH_V12 = """
CREATE TABLE IF NOT EXISTS cdr_webhook.endpoint_health (
    endpoint     text        NOT NULL,
    bucket       timestamptz NOT NULL,
    attempts     integer     NOT NULL,
    delivered    integer     NOT NULL,
    retried      integer     NOT NULL,
    failed       integer     NOT NULL,
    latency_hist integer[]   NOT NULL,
    pickup_hist  integer[]   NOT NULL,
    PRIMARY KEY (endpoint, bucket)
);
CREATE INDEX IF NOT EXISTS endpoint_health_bucket_idx ON cdr_webhook.endpoint_health (bucket);

CREATE OR REPLACE FUNCTION cdr_webhook.histogram_add(a integer[], b integer[]) RETURNS integer[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_agg(COALESCE(x, 0) + COALESCE(y, 0) ORDER BY i)
    FROM unnest(a, b) WITH ORDINALITY AS t(x, y, i)
$$;
"""

# Step 13: the commit watcher's health (cdr_webhook.ledger.watch_health), for the page, the select step and
# the CLI: seen_at is its last heartbeat (written every few seconds while it can reach the database, so a
# stale one means it cannot: no triggerer, or no connection), health its state since health_since,
# health_error why it is not watching (one line, scrubbed), heartbeat_seconds the longest it may go
# between two heartbeats in that state.
_WATCH_HEALTH_V13 = """
ALTER TABLE cdr_webhook.watch_state ADD COLUMN IF NOT EXISTS seen_at timestamptz;
ALTER TABLE cdr_webhook.watch_state ADD COLUMN IF NOT EXISTS health text
    CHECK (health IN ('watching', 'source_failing', 'error'));
ALTER TABLE cdr_webhook.watch_state ADD COLUMN IF NOT EXISTS health_since timestamptz;
ALTER TABLE cdr_webhook.watch_state ADD COLUMN IF NOT EXISTS health_error text
    CHECK (char_length(health_error) <= 500);
ALTER TABLE cdr_webhook.watch_state ADD COLUMN IF NOT EXISTS heartbeat_seconds double precision;
"""

# Step 14: each endpoint's backlog per 5 minutes (cdr_webhook.ledger.health), a snapshot of its queued rows
# that the select step takes at most once per bucket: backlog_snapshot holds the last bucket taken, so
# every other run of the bucket reads one row and writes nothing. An endpoint with nothing queued has no
# row: its chart draws an empty step.
_BACKLOG_V14 = """
CREATE TABLE IF NOT EXISTS cdr_webhook.endpoint_backlog (
    endpoint  text        NOT NULL,
    bucket    timestamptz NOT NULL,
    queued    integer     NOT NULL,
    in_flight integer     NOT NULL,
    retrying  integer     NOT NULL,
    PRIMARY KEY (endpoint, bucket)
);
CREATE INDEX IF NOT EXISTS endpoint_backlog_bucket_idx ON cdr_webhook.endpoint_backlog (bucket);
CREATE TABLE IF NOT EXISTS cdr_webhook.backlog_snapshot (
    singleton boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    bucket    timestamptz NOT NULL
);
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
    Step(6, "attempt history and the Deliveries page's list indexes", _ATTEMPTS_V6),
    Step(
        7,
        "reconciliation in slices: a cursor on the watermark",
        # A reconciliation checks the window a slice at a time: reconcile_cursor is where the next
        # slice begins, reconcile_until where the current sweep of the window ends (NULL: none yet,
        # the next reconciliation starts a sweep).
        "ALTER TABLE cdr_webhook.watermark ADD COLUMN IF NOT EXISTS reconcile_cursor timestamptz; "
        "ALTER TABLE cdr_webhook.watermark ADD COLUMN IF NOT EXISTS reconcile_until timestamptz",
    ),
    Step(8, "the commit watcher's state", _WATCH_V8),
    Step(
        9,
        "how far retention has pruned the ledger",
        # pruned_before: finished rows of CDRs created before it may be gone (NULL: none ever were);
        # known = false on an install that had ledger rows before this step, whose pruning is unknown
        # until its next prune records a bound (a policy missing window is checked as before then).
        "CREATE TABLE IF NOT EXISTS cdr_webhook.retention ("
        "  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),"
        "  pruned_before timestamptz,"
        "  known boolean NOT NULL,"
        "  updated_at timestamptz NOT NULL DEFAULT now()); "
        "INSERT INTO cdr_webhook.retention (known) "
        "SELECT NOT EXISTS (SELECT 1 FROM cdr_webhook.delivery) ON CONFLICT DO NOTHING",
    ),
    Step(
        10,
        "since when an endpoint has failed every attempt",
        # attempts_failing_since: the first failed attempt (retryable ones too) after the endpoint's
        # last success; NULL while its last attempt succeeded. pause_after_minutes reads it.
        "ALTER TABLE cdr_webhook.endpoint_state ADD COLUMN IF NOT EXISTS attempts_failing_since timestamptz",
    ),
    Step(11, "test CDRs as endpoint events", _TESTS_V11),
    Step(12, "each endpoint's health per 5 minutes", _HEALTH_V12),
    Step(13, "the commit watcher's heartbeat and health", _WATCH_HEALTH_V13),
    Step(14, "each endpoint's backlog per 5 minutes", _BACKLOG_V14),
    Step(15, "the owner-alert outbox, owed by every pause and resume", owner_alerts.DDL_V15),
    Step(
        16,
        "each endpoint's OAuth2 access token, shared by every worker",
        # token: the access token, Fernet-encrypted (cdr_webhook.deliver.auth: a key derived from
        # Airflow's fernet_key and the client secret), never plain text; NULL until the first fetch.
        # The row is also the lock that makes one worker fetch while the others wait for its token.
        "CREATE TABLE IF NOT EXISTS cdr_webhook.oauth2_token ("
        "  endpoint   text        PRIMARY KEY,"
        "  token      bytea,"
        "  fetched_at timestamptz,"
        "  expires_at timestamptz,"
        "  fetches    bigint      NOT NULL DEFAULT 0,"
        "  updated_at timestamptz NOT NULL DEFAULT now())",
    ),
    Step(
        17,
        "each rate-limited endpoint's next free send time",
        # One row per endpoint with a rate limit (ledger.rates): every task reserves its send times
        # here, so the limit holds across workers, tasks and runs. Written by row lock, never scanned.
        "CREATE TABLE IF NOT EXISTS cdr_webhook.endpoint_pace ("
        "  endpoint text PRIMARY KEY,"
        "  next_at timestamptz NOT NULL,"
        "  updated_at timestamptz NOT NULL DEFAULT now())",
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
