"""The commit watcher's health: the heartbeat it records in ``cdr_webhook.watch_state`` (schema step 13),
and what that means for an operator (the page's banner, the select step's warning, ``watch status``).

The watcher writes while it can reach the CDR database; when it cannot (no triggerer, no connection)
it writes nothing, and its heartbeat going stale is the signal.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datetime as dt

    import psycopg

#: The least seconds between two heartbeats in the same state (a change of state is written at once):
#: a 1 s poll does not write every second.
HEARTBEAT_SECONDS = 5.0
#: The longest error text recorded (the column's CHECK says the same).
MAX_ERROR_CHARS = 500
#: A heartbeat older than this many of its own periods, plus the slack a fire's restart takes, is stale.
STALE_AFTER_BEATS = 3
STALE_SLACK_SECONDS = 10.0

#: The states the watcher records.
WATCHING, SOURCE_FAILING, ERROR = "watching", "source_failing", "error"

#: What an operator reads when the watcher does not deliver within seconds: what it costs.
MINUTE_ONLY = "CDRs are delivered by the minute schedule only, so about a minute after their commit"


_CHECK_TRIGGERER = (
    "Check that the triggerer runs (airflow jobs check --job-type TriggererJob) and the DAG is unpaused "
    "(a paused DAG's watcher does not run), and read the triggerer's log for 'CDR commit watcher' lines: "
    "a connection error names its cause."
)


@dataclasses.dataclass(frozen=True)
class Health:
    """The watcher's row as recorded, read with the database's clock."""

    now: dt.datetime
    seen_at: dt.datetime | None
    state: str | None
    since: dt.datetime | None
    error: str | None
    heartbeat_seconds: float | None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the health means: ``ok`` or not, a state name, one line saying it, and what to do."""

    ok: bool
    state: str  # off | never_seen | stale | error | source_failing | watching
    headline: str
    advice: str = ""
    age_seconds: float | None = None  # of the heartbeat; None when there is none


def stale_after(heartbeat_seconds: float | None) -> float:
    """Seconds after which a heartbeat recorded with this period means the watcher has stopped."""
    beat = max(heartbeat_seconds or HEARTBEAT_SECONDS, HEARTBEAT_SECONDS)
    return STALE_AFTER_BEATS * beat + STALE_SLACK_SECONDS


def ago(seconds: float) -> str:
    """A short age: 2 s, 3 min, 5 h, 2 d."""
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size:.0f} {unit}"
    return f"{seconds:.0f} s"


def assess(health: Health | None, *, interval_seconds: float) -> Verdict:
    """Judge the watcher's recorded health; ``interval_seconds`` is the setting (0: switched off)."""
    if not interval_seconds:
        return Verdict(
            False,
            "off",
            f"Commit watcher: off (watch_interval_seconds = 0). {MINUTE_ONLY}.",
            "To deliver within seconds, set watch_interval_seconds in [cdr_webhook] (default 1) and run "
            "Airflow's triggerer.",
        )
    if health is None or health.seen_at is None:
        return Verdict(
            False,
            "never_seen",
            "Commit watcher: never seen. It has recorded no heartbeat: Airflow's triggerer may not be "
            "running, the cdr_webhook DAG may never have been unpaused, or the watcher has never reached "
            f"the CDR database. {MINUTE_ONLY}.",
            _CHECK_TRIGGERER,
        )
    age = (health.now - health.seen_at).total_seconds()
    if age > stale_after(health.heartbeat_seconds):
        return Verdict(
            False,
            "stale",
            f"Commit watcher: last seen {ago(age)} ago (it reports every "
            f"{max(health.heartbeat_seconds or 0, HEARTBEAT_SECONDS):g} s): the triggerer may be down, "
            f"the DAG paused, or the watcher cannot reach the CDR database. {MINUTE_ONLY}.",
            _CHECK_TRIGGERER,
            age,
        )
    since = f" for {ago((health.now - health.since).total_seconds())}" if health.since else ""
    if health.state == ERROR:
        return Verdict(
            False,
            "error",
            f"Commit watcher: failing{since}, retrying with a back-off: {health.error}. {MINUTE_ONLY}.",
            "Fix what the error names (the Airflow connection cdr_db, the database); the watcher "
            "resumes by itself. Or set watch_interval_seconds = 0 to switch it off.",
            age,
        )
    if health.state == SOURCE_FAILING:
        return Verdict(
            False,
            "source_failing",
            f"Commit watcher: the source check fails{since}: {health.error}. The watcher starts no run; "
            "each scheduled run fails its select_cdrs task with this reason, so no CDR is delivered.",
            "Run python -m cdr_webhook source check and fix the source relation; the watcher and the "
            "runs resume by themselves.",
            age,
        )
    return Verdict(True, "watching", f"commit watcher: watching, last seen {ago(age)} ago", age_seconds=age)


def one_line(text: str) -> str:
    """``text`` on one line, at most :data:`MAX_ERROR_CHARS` characters (scrub it first)."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


# -- SQL ------------------------------------------------------------------------------------------

# An upsert: with a watermark, a watcher that never fired has no row yet. Only the watching loop
# makes one, after its first-start baseline (a row makes the baseline be skipped); an error is recorded
# with the UPDATE alone, since it may come before the baseline.
_UPSERT = (
    "INSERT INTO cdr_webhook.watch_state AS s "
    "(source_relation, seen_at, health, health_since, health_error, heartbeat_seconds) "
    "VALUES (%(rel)s, now(), %(state)s, now(), %(error)s, %(every)s) "
    "ON CONFLICT (source_relation) DO UPDATE SET seen_at = now(), "
    "health_since = CASE WHEN s.health IS DISTINCT FROM EXCLUDED.health THEN now() ELSE s.health_since END, "
    "health = EXCLUDED.health, health_error = EXCLUDED.health_error, "
    "heartbeat_seconds = EXCLUDED.heartbeat_seconds"
)
_UPDATE = (
    "UPDATE cdr_webhook.watch_state SET seen_at = now(), "
    "health_since = CASE WHEN health IS DISTINCT FROM %(state)s::text THEN now() ELSE health_since END, "
    "health = %(state)s::text, health_error = %(error)s::text, heartbeat_seconds = %(every)s "
    "WHERE source_relation = %(rel)s"
)

_READ = (
    "SELECT now(), s.seen_at, s.health, s.health_since, s.health_error, s.heartbeat_seconds "
    "FROM (SELECT 1) AS one LEFT JOIN cdr_webhook.watch_state AS s ON s.source_relation = %s"
)


async def record(
    conn: psycopg.AsyncConnection[Any],
    relation: str,
    state: str,
    error: str | None,
    every: float,
    *,
    create: bool,
) -> bool:
    """
    One heartbeat: the state, its error (made one bounded line), the longest wait before the next.
    ``create``: make the row when there is none; else return False when there is none.
    """
    cur = await conn.execute(
        _UPSERT if create else _UPDATE,
        {"rel": relation, "state": state, "error": one_line(error) if error else None, "every": every},
    )
    return cur.rowcount > 0


def read(conn: psycopg.Connection[Any], relation: str) -> Health:
    row = conn.execute(_READ, (relation,)).fetchone()
    assert row is not None  # the outer SELECT 1 always returns its row
    return Health(*row)


def watcher_verdict(conn: psycopg.Connection[Any], relation: str, interval_seconds: float) -> Verdict:
    """The watcher of ``relation`` judged now (the page, the select step and the CLI read it so)."""
    if not interval_seconds:
        return assess(None, interval_seconds=0)
    return assess(read(conn, relation), interval_seconds=interval_seconds)
