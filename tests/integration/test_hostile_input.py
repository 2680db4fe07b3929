"""Hostile input at volume (issue #18 item 2): the select step and the POST tasks over real PostgreSQL
and a real receiver on 127.0.0.1, with bad CDRs among good ones.

Every good CDR is delivered once; every bad one is recorded ``skipped`` once, its reason naming the
column and a bounded, one-line rendering of the value; no select step or task fails because of them.
``HOSTILE_GOOD_CDRS`` sets the volume test's good CDRs (10,000 unless set; a tenth as many bad ones).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import random
import resource
import time
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from airflow.sdk.exceptions import AirflowFailException

from cdr_webhook.deliver.operator import CdrWebhookOperator
from cdr_webhook.ledger import LONG_CDR_ID_PREFIX, NULL_CDR_ID_PREFIX
from cdr_webhook.payload import SOURCE_COLUMNS
from cdr_webhook.selection.dry_run import previews
from cdr_webhook.selection.source import SourceError
from cdr_webhook.selection.step import RunInfo, claim_cdrs
from cdr_webhook.settings import Settings
from demo.receiver import Receiver
from tests.integration.hostile_rows import BAD_KINDS, FEED, copy_rows, create_feed, good_row
from tests.support.endpoint_configs import configs
from tests.support.task_instances import API_KEY, ENDPOINT, SECRET, FakeTaskInstance, connect_endpoint

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
CONNECTIONS = configs({ENDPOINT: {}, "cdr_webhook": {}})
GOOD = int(os.environ.get("HOSTILE_GOOD_CDRS", "10000"))

#: Valid but odd values, each on one good CDR: delivered as they are (docs/payload.md).
ODD_GOOD = {
    "rtl-override": {"campaign_name": "\u202egnp.exe\u202c \u2067isolate\u2069 \u200f"},
    "controls-and-separators": {"callerid": "tab\there\nnew line\r\u2028\u2029\u200b\ufeff"},
    "emoji-and-combining": {
        "campaign_name": "\U0001f4de Cafe\u0301 \u4e2d\u6587 \u0627\u0644\u0639\u0631\u0628\u064a\u0629"
    },
    "template-text": {"campaign_name": "{{ 7 * 7 }} ${jndi:ldap://x} <script>"},
    "200-kb-name": {"campaign_name": "n" * 200_000},  # under the 256 KiB body limit
    "1000-phonebooks": {
        "list_phonebook_id": list(range(1000)),
        "list_phonebook_name": [f"b{i}" for i in range(1000)],
    },
    "40-digit-cost": {"cost": Decimal("1234567890123456789012345678901234.567890")},
    "40-digit-phone": {"phone_number": "+" + "9" * 40},
    "minus-zero-cost": {"cost": Decimal("-0.000")},
    "bigint-bounds": {"campaign_id": Decimal(2**63 - 1), "hangup_cause_code": Decimal(-(2**63))},
    "a-year-long": {"billed_duration": Decimal(365 * 24 * 3600)},
    "year-1": {"call_date": "0001-01-01 12:00:00+00"},
    "year-9999": {"call_date": "9999-12-31 12:00:00+00"},
    "dst-repeated-first": {"call_date": "2026-10-25 02:30:00+02"},  # Madrid's repeated hour, CEST
    "dst-repeated-second": {"call_date": "2026-10-25 02:30:00+01"},  # the same wall time, CET
    "naive-dst-gap": {"call_date": "2026-03-29 02:30:00"},  # a wall time Madrid skips
    "naive-dst-repeated": {"call_date": "2026-10-25 02:30:00"},  # a wall time Madrid has twice
    "naive": {"call_date": "2026-11-28 10:30:05"},
    "far-offset": {"call_date": "2026-11-28 23:59:59.999999-12:00"},
}


@dataclasses.dataclass
class Feed:
    """What was written: the good CDR ids, and the bad ones by the column their reason must name."""

    good: list[str]
    bad: dict[str, str]  # cdr_id -> column
    null_id_rows: int  # bad rows without a cdr_id: the ledger keys them by the row


def write_feed(conn, good: int, bad: int) -> Feed:
    """``good`` good CDRs (the odd ones first), ``bad`` bad ones cycling through every kind, shuffled."""
    create_feed(conn)
    entries: list[tuple[str, str | None, dict]] = []
    good_ids = [f"good-{i:05d}" for i in range(good)]
    odd = list(ODD_GOOD.values())
    for i, cdr_id in enumerate(good_ids):
        entries.append(("good", cdr_id, odd[i] if i < len(odd) else {}))
    kinds: dict[str, str] = {}
    null_ids = 0
    for j in range(bad):
        kind = BAD_KINDS[j % len(BAD_KINDS)]
        cdr_id = f"bad-{j:04d}-{kind.name}"
        if kind.name == "long-cdr-id":
            cdr_id = kind.values["cdr_id"] + str(j)
        if kind.name == "null-cdr-id":
            null_ids += 1
        else:
            kinds[cdr_id] = kind.column
        entries.append((kind.name, cdr_id, {k: v for k, v in kind.values.items() if k != "cdr_id"}))
    random.Random(18).shuffle(entries)
    step = dt.timedelta(seconds=50) / len(entries)
    rows = []
    for index, (kind, cdr_id, values) in enumerate(entries):
        created = T0 + index * step
        row = good_row(None if kind == "null-cdr-id" else cdr_id, created, index, **values)
        rows.append(row)
        if kind == "ambiguous-duplicate":
            rows.append({**row, "cost": Decimal("9.99")})
    by_id = {row["cdr_id"]: row for row in rows}
    # Duplicates of good CDRs: an identical row (one CDR), and a later row of the same cdr_id.
    rows.append(dict(by_id[good_ids[-1]]))
    rows.append(
        {**by_id[good_ids[-2]], "created_at": by_id[good_ids[-2]]["created_at"] + step / 2, "cost": 1}
    )
    copy_rows(conn, rows)
    return Feed(good_ids, kinds, null_ids)


def ledger(conn) -> dict[str, tuple[str, str | None, int]]:
    rows = conn.execute("SELECT cdr_id, status, error, attempts FROM cdr_webhook.delivery").fetchall()
    return {cdr_id: (status, error, attempts) for cdr_id, status, error, attempts in rows}


def stored_call_dates(conn, cdr_ids: list[str]) -> dict[str, str]:
    """The call dates PostgreSQL stored, as the instants it holds (read in UTC)."""
    conn.execute("SET TimeZone = 'UTC'")
    rows = conn.execute(f"SELECT cdr_id, call_date FROM {FEED} WHERE cdr_id = ANY(%s)", (cdr_ids,)).fetchall()
    return {cdr_id: call_date.isoformat() for cdr_id, call_date in rows}


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def deliver(mapped, cdrs_per_task: int) -> None:
    """Run each mapped post_cdr task's first try, as the workers would."""
    for index, task in enumerate(mapped):
        operator = CdrWebhookOperator(
            task_id="post_cdr",
            cdr_ids=task["cdr_ids"],
            http_conn_id=task["http_conn_id"],
            cdrs_per_task=cdrs_per_task,
            retries=2,
        )
        operator.execute({"ti": FakeTaskInstance(map_index=index)})


def check_outcome(conn, feed: Feed, receiver: Receiver) -> None:
    """Every good CDR delivered once, as written; every bad one skipped once, with a bounded reason."""
    received = receiver.received()
    sent = [r.cdr_id for r in received]
    assert len(sent) == len(set(sent)) == len(feed.good)  # one POST each, nothing else
    assert set(sent) == set(feed.good)
    assert all(r.signature_ok for r in received)
    rows = ledger(conn)
    assert len(rows) == len(feed.good) + len(feed.bad) + feed.null_id_rows  # each recorded once
    assert {rows[cdr_id][0] for cdr_id in feed.good} == {"delivered"}
    for cdr_id, column in feed.bad.items():
        status, error, attempts = rows[cdr_id] if cdr_id in rows else _long_id_row(rows, cdr_id)
        assert (status, attempts) == ("skipped", 0), cdr_id
        assert f"column {column}" in error, (cdr_id, error)
        assert len(error) <= 600, (cdr_id, error)  # bounded
        assert error.isprintable(), (cdr_id, error)  # one line, no control or bidi character
    null_rows = [row for key, row in rows.items() if key.startswith(NULL_CDR_ID_PREFIX)]
    assert len(null_rows) == feed.null_id_rows
    assert all(row[0] == "skipped" and "column cdr_id is NULL" in row[1] for row in null_rows)
    assert all(len(row[1]) <= 600 and row[1].isprintable() for row in null_rows)
    by_id = {r.cdr_id: r for r in received}
    # The duplicated CDRs went out once (above), from their earliest row.
    assert by_id[feed.good[-2]].payload["cost"] == 0.0525
    check_odd_values(conn, by_id, feed)


def _long_id_row(rows, cdr_id: str):
    """A cdr_id too long for the ledger is recorded under ``long-cdr-id:<md5>``."""
    return rows[LONG_CDR_ID_PREFIX + hashlib.md5(cdr_id.encode()).hexdigest()]


def check_odd_values(conn, received: dict, feed: Feed) -> None:
    """The odd but valid values arrived as written (text byte-exact, numbers exact, dates as stored)."""
    odd_ids = dict(zip(feed.good, ODD_GOOD, strict=False))
    dates = stored_call_dates(conn, list(odd_ids))
    for cdr_id, name in odd_ids.items():
        body = received[cdr_id].body
        payload = json.loads(body, parse_float=Decimal)
        for column, value in ODD_GOOD[name].items():
            if column == "call_date":
                assert dt.datetime.fromisoformat(payload[column]) == dt.datetime.fromisoformat(dates[cdr_id])
            elif column == "cost":
                assert payload[column] == value
            elif isinstance(value, str):
                assert payload[column] == value
                assert json.dumps(value, ensure_ascii=False)[1:-1].encode() in body  # not \\u-escaped
            else:
                assert payload[column] == (int(value) if isinstance(value, Decimal) else value)
    naive = feed.good[list(ODD_GOOD).index("naive")]
    # 10:30:05 without an offset, written in a Madrid session: PostgreSQL read it as CET.
    assert received[naive].payload["call_date"] == "2026-11-28T09:30:05+00:00"


def run(conn, settings: Settings, cdrs_per_task: int, run_number: int = 1):
    info = RunInfo("cdr_webhook", f"scheduled__{run_number}", "scheduled", T0 + (run_number - 1) * MINUTE,
                   T0 + run_number * MINUTE, {})  # fmt: skip
    return claim_cdrs(
        conn, info, settings, now=T0 + (run_number + 1) * MINUTE, connections=CONNECTIONS,
        cdrs_per_task=cdrs_per_task,
    )  # fmt: skip


@pytest.fixture
def receiver(settings_env):
    """The endpoint's receiver; the POST tasks read the hostile feed."""
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__SOURCE_RELATION", FEED)
    with Receiver(secret=SECRET, api_key=API_KEY) as server:
        connect_endpoint(settings_env, server.url, signing_secret=SECRET)
        yield server


def test_at_volume_in_chunk_mode_every_good_cdr_is_delivered_every_bad_one_recorded_once(db, receiver):
    bad = max(GOOD // 10, len(BAD_KINDS))
    feed = write_feed(db, GOOD, bad)
    settings = Settings(source_relation=FEED, max_cdrs_per_run=GOOD + bad + 10, lag_seconds=60)
    rss_before = maxrss_mib()

    started = time.monotonic()
    mapped = run(db, settings, cdrs_per_task=1000)
    selected = time.monotonic() - started
    rss_selected = maxrss_mib()
    started = time.monotonic()
    deliver(mapped, cdrs_per_task=1000)
    delivered = time.monotonic() - started

    check_outcome(db, feed, receiver)
    assert run(db, settings, cdrs_per_task=1000, run_number=2) == []  # the next run: nothing anew
    assert len(ledger(db)) == len(feed.good) + len(feed.bad) + feed.null_id_rows
    print(
        f"\nhostile volume: {GOOD} good + {bad} bad CDRs; select step {selected:.1f} s, "
        f"delivery ({len(mapped)} chunk tasks) {delivered:.1f} s; peak RSS {rss_before:.0f} MiB before, "
        f"{rss_selected:.0f} MiB after the select step, {maxrss_mib():.0f} MiB after delivery; "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def test_per_cdr_mode_delivers_the_good_and_records_every_kind_of_bad_once(db, receiver):
    feed = write_feed(db, len(ODD_GOOD) + 5, len(BAD_KINDS))
    settings = Settings(source_relation=FEED, max_cdrs_per_run=500, lag_seconds=60)

    mapped = run(db, settings, cdrs_per_task=1)
    assert sorted(cdr for task in mapped for cdr in task["cdr_ids"]) == sorted(feed.good)
    deliver(mapped, cdrs_per_task=1)  # no task fails

    check_outcome(db, feed, receiver)


def test_the_select_step_checks_a_task_of_one_cdr_and_leaves_a_chunks_rows_to_the_chunk(db):
    feed = write_feed(db, 5, len(BAD_KINDS))
    settings = Settings(source_relation=FEED, max_cdrs_per_run=500, lag_seconds=60)

    mapped = run(db, settings, cdrs_per_task=1000)

    in_chunks = {cdr for task in mapped for cdr in task["cdr_ids"]}
    unchecked = [cdr for cdr in feed.bad if cdr in in_chunks]
    assert unchecked  # mapped into the chunk, not read or built by the select step
    assert {ledger(db)[cdr][0] for cdr in unchecked} == {"queued"}
    assert set(feed.good) <= in_chunks


@pytest.mark.parametrize("cdrs_per_task", [1, 3], ids=["per-cdr", "chunk"])
def test_a_body_over_max_payload_bytes_at_send_time_is_skipped_not_sent(db, receiver, cdrs_per_task):
    feed = write_feed(db, 3, 0)
    big = feed.good[1]
    settings = Settings(source_relation=FEED, max_cdrs_per_run=500, lag_seconds=60)
    mapped = run(db, settings, cdrs_per_task=cdrs_per_task)
    # The row grows after the select step checked it (a dialer's late UPDATE).
    db.execute(f"UPDATE {FEED} SET campaign_name = to_json(repeat('x', 300000)) WHERE cdr_id = %s", (big,))

    if cdrs_per_task == 1:
        tasks = {task["cdr_ids"][0]: [task] for task in mapped}
        deliver(tasks.pop(feed.good[0]) + tasks.pop(feed.good[2]), cdrs_per_task=1)
        with pytest.raises(
            AirflowFailException, match=f"CDR {big} cannot be sent: .* over max_payload_bytes"
        ):
            deliver(tasks[big], cdrs_per_task=1)
    else:  # a chunk checks its rows as it builds their bodies: skipped, as the select step skips one
        deliver(mapped, cdrs_per_task=3)

    rows = ledger(db)
    status, error, attempts = rows[big]
    assert (status, attempts) == ("skipped", 0)  # never sent, never retried
    assert error.startswith(f"CDR '{big}': column campaign_name = 'xxx")
    assert "(300000 characters): makes the body" in error
    assert "over max_payload_bytes = 262144: not sent" in error
    assert sorted(r.cdr_id for r in receiver.received()) == [feed.good[0], feed.good[2]]


def test_the_select_step_refuses_a_body_over_max_payload_bytes_before_any_task(db):
    feed = write_feed(db, 2, 0)
    db.execute(
        f"UPDATE {FEED} SET campaign_name = to_json(repeat('y', 5000)) WHERE cdr_id = %s", (feed.good[0],)
    )
    settings = Settings(source_relation=FEED, max_cdrs_per_run=500, lag_seconds=60, max_payload_bytes=4096)

    mapped = run(db, settings, cdrs_per_task=1)

    assert [task["cdr_ids"] for task in mapped] == [[feed.good[1]]]
    status, error, _ = ledger(db)[feed.good[0]]
    assert status == "skipped"
    assert "column campaign_name = 'yyy" in error
    assert "over max_payload_bytes = 4096" in error


@pytest.mark.parametrize(
    ("value", "refused"),
    [("a\x00b", "NUL"), ("a\ud800b", "surrogates not allowed")],
    ids=["nul", "lone-surrogate"],
)
def test_postgresql_text_cannot_hold_nul_or_a_lone_surrogate(db, value, refused):
    # So only a json column brings them to the mapping (the hostile rows above), which refuses them.
    db.execute("CREATE TEMP TABLE t (v text)")
    with pytest.raises((psycopg.DataError, UnicodeEncodeError), match=refused):
        db.execute("INSERT INTO t VALUES (%s)", (value,))
    sql_form = "chr(0)" if value == "a\x00b" else "E'\\uD800'"
    with pytest.raises(psycopg.errors.DatabaseError):
        db.execute(f"INSERT INTO t VALUES ({sql_form})")


def test_a_numeric_client_id_is_refused_and_the_cast_it_names_skips_fractions_saying_so(db):
    # client_id routes inside SQL: a fraction there matched no route (the CDR was never queued, lost)
    # and a value beyond a bigint failed every run. The check refuses the type, naming a safe cast.
    feed = write_feed(db, 3, 0)
    db.execute(f"ALTER TABLE {FEED} ALTER COLUMN client_id TYPE numeric")
    db.execute(f"UPDATE {FEED} SET client_id = 7.5 WHERE cdr_id = %s", (feed.good[0],))
    db.execute(f"UPDATE {FEED} SET client_id = 1e39 WHERE cdr_id = %s", (feed.good[1],))
    settings = Settings(source_relation=FEED, max_cdrs_per_run=500, lag_seconds=60)
    with pytest.raises(SourceError, match="column client_id is numeric, which cannot carry") as refused:
        run(db, settings, cdrs_per_task=1)
    cast = refused.value.args[0].split("write it in the view as ")[1].split(" AS client_id")[0]

    columns = ", ".join(f"{cast} AS client_id" if c == "client_id" else c for c in SOURCE_COLUMNS)
    db.execute(f"CREATE VIEW public.hostile_view AS SELECT {columns} FROM {FEED}")
    mapped = run(db, dataclasses.replace(settings, source_relation="public.hostile_view"), cdrs_per_task=1)

    assert [task["cdr_ids"] for task in mapped] == [[feed.good[2]]]
    rows = ledger(db)
    for cdr_id in feed.good[:2]:
        assert rows[cdr_id][:2] == ("skipped", f"CDR {cdr_id!r}: column client_id = None: must not be NULL")


def test_a_dry_run_says_which_cdrs_the_limits_would_skip(db):
    # What `python -m cdr_webhook cdrs dry-run` prints: the same rules as a run, nothing written.
    feed = write_feed(db, 2, len(BAD_KINDS))
    db.execute(
        f"UPDATE {FEED} SET campaign_name = to_json(repeat('z', 5000)) WHERE cdr_id = %s", (feed.good[0],)
    )
    settings = Settings(source_relation=FEED, max_payload_bytes=4096)

    window = {"start": T0, "end": T0 + MINUTE, "client_id": None, "connections": CONNECTIONS, "limit": 5000}
    shown: dict[str, Any] = {}
    again = []
    for item in previews(db, settings, **window):
        if item.cdr_id in shown:
            again.append((item.cdr_id, item.not_sent))
        else:
            shown[item.cdr_id] = item

    assert shown[feed.good[1]].body is not None
    assert "over max_payload_bytes = 4096" in shown[feed.good[0]].not_sent
    for cdr_id, column in feed.bad.items():
        assert shown[cdr_id].body is None, cdr_id
        assert column in shown[cdr_id].not_sent, (cdr_id, shown[cdr_id].not_sent)
    # The duplicates, each once more: a later row of a good CDR, the identical row of the other, the
    # ambiguous pair's second row. A run sends (or skips) each of them once.
    ambiguous = next(cdr_id for cdr_id in feed.bad if cdr_id.endswith("ambiguous-duplicate"))
    assert sorted(again) == [
        (cdr_id, "another row of this cdr_id, shown above, is the CDR")
        for cdr_id in sorted([*feed.good, ambiguous])
    ]
    assert db.execute("SELECT count(*) FROM cdr_webhook.delivery").fetchone()[0] == 0
