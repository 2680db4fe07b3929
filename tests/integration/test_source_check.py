"""The source checks against a real PostgreSQL: types, a failing cast, the index, skipped rows, the run.

A view mistake must fail the run (not the CDRs), and `source check` / `source preview` must say what a
run would do without doing it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from decimal import Decimal

import pytest

from cdr_webhook.__main__ import main
from cdr_webhook.payload import PAYLOAD_FIELDS, InvalidCdr, build_payload, encode_body
from cdr_webhook.selection import source_check
from cdr_webhook.selection.source import SourceError, check_source, column_types, fetch_rows
from cdr_webhook.selection.step import RunInfo, claim_cdrs
from cdr_webhook.settings import Settings
from cdr_webhook.source_types import RULES
from cdr_webhook.watch import notify
from demo.connections import http_conn
from demo.dialer import REFERENCE_SCHEMA, Dialer
from demo.receiver import Receiver
from tests.support.endpoint_configs import configs
from tests.support.payloads import source_row
from tests.support.source_feed import FEED, add_feed_row, create_feed

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
SETTINGS = Settings(lag_seconds=60, max_cdrs_per_run=500)
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
REFERENCE_VIEW = re.search(
    r"CREATE OR REPLACE VIEW public\.cdr_webhook_source AS.*?;", REFERENCE_SCHEMA.read_text(), re.S
)


def replace_view(conn, old: str, new: str) -> None:
    """Recreate the reference view with one expression changed (a type change needs DROP, not REPLACE)."""
    assert REFERENCE_VIEW is not None
    assert old in REFERENCE_VIEW.group(0)
    conn.execute("DROP VIEW public.cdr_webhook_source")
    conn.execute(REFERENCE_VIEW.group(0).replace(old, new))


@pytest.fixture(autouse=True)
def _database_from_the_airflow_connection(monkeypatch):
    # The CLI's --dsn, else $CDR_DATABASE_URL, else cdr_db: these tests use the last (the fixture's).
    monkeypatch.delenv("CDR_DATABASE_URL", raising=False)


TEXT_CODE = ("cdr.hangup_cause_code::integer ", "cdr.hangup_cause_code::text ")
# Cast in the view, failing on the one CDR whose code the dialer wrote as '' (here: cost 0).
FAILING_CAST = (
    "cdr.hangup_cause_code::integer ",
    "(CASE WHEN cdr.cost = 0 THEN '' ELSE cdr.hangup_cause_code::text END)::integer ",
)


# -- the rules agree with the mapping --------------------------------------------------------------

# (SQL type, a value of it): what psycopg loads for it is what build_payload sees.
SAMPLES = {
    "smallint": "17",
    "integer": "17",
    "bigint": "17",
    "numeric": "17",
    "real": "17",
    "double precision": "17",
    "text": "17",
    "character varying": "17",
    "uuid": "6f1c2a4e-9b1d-5c8e-a3f0-2d7b4e6c8a10",
    "boolean": "true",
    "timestamp with time zone": "2026-11-28 09:00:00+00",
    "timestamp without time zone": "2026-11-28 09:00:00",
    "date": "2026-11-28",
    "interval": "17 seconds",
    "jsonb": "17",
    "bigint[]": "{17}",
    "integer[]": "{17}",
    "text[]": "{a}",
    "character varying[]": "{a}",
}


@pytest.mark.parametrize("column", PAYLOAD_FIELDS)
def test_a_type_the_check_refuses_is_one_the_mapping_refuses(cdr_db, column):
    rule = RULES[column]
    for type_name, literal in SAMPLES.items():
        value = cdr_db.execute(f"SELECT %s::{type_name}", (literal,)).fetchone()[0]
        row = source_row(**{column: value})
        if column == "list_phonebook_id":
            row["list_phonebook_name"] = ["a"]  # the arrays pair up
        if column == "list_phonebook_name":
            row["list_phonebook_id"] = [1]
        try:
            build_payload(row)
            mapped = True
        except InvalidCdr:
            mapped = False
        if type_name in rule.accepted:
            assert mapped, f"{column} {type_name}: the check accepts it, the mapping refuses {value!r}"
        elif not rule.allows(type_name) and not (column == "client_id" and type_name in ROUTED_STRICTER):
            assert not mapped, f"{column} {type_name}: the check refuses it, the mapping takes {value!r}"


#: client_id routes the CDR inside SQL, before the mapping: the check refuses these, whose whole values
#: the mapping would take, because a fraction matched no route there and a value beyond bigint failed.
ROUTED_STRICTER = frozenset({"numeric", "real", "double precision", "jsonb"})


def test_the_reference_views_types_are_read_from_the_catalog(cdr_db):
    types = column_types(cdr_db, "cdr_webhook_source")
    assert types["hangup_cause_code"] == "integer"
    assert types["list_phonebook_id"] == "bigint[]"
    assert types["call_date"] == "timestamp with time zone"
    cdr_db.execute("CREATE DOMAIN public.code AS smallint")
    cdr_db.execute("CREATE TYPE public.leg AS ENUM ('a', 'b')")
    cdr_db.execute("CREATE TABLE public.typed (c public.code, l public.leg, ls public.leg[])")
    try:
        assert column_types(cdr_db, "public.typed") == {"c": "smallint", "l": "enum", "ls": "enum[]"}
    finally:
        cdr_db.execute("DROP TABLE public.typed; DROP TYPE public.leg; DROP DOMAIN public.code")


# -- source check, check by check ------------------------------------------------------------------


def test_a_wrong_type_is_named_with_its_cast(cdr_db, capsys):
    Dialer(cdr_db).cdr()
    replace_view(cdr_db, *TEXT_CODE)

    assert main(["source", "check"]) == 1

    out = capsys.readouterr().out
    assert "columns  FAIL" in out
    assert (
        "column hangup_cause_code is text, which cannot carry the payload's hangup_cause_code (it needs "
        "smallint, integer or bigint): write it in the view as CASE WHEN hangup_cause_code ~ '^[0-9]{1,9}$' "
        "THEN hangup_cause_code::integer END AS hangup_cause_code" in out
    )
    # The sample shows what a run over it would have done: every CDR skipped.
    assert "1 of the newest 1 CDRs would be skipped" in out
    assert "hangup_cause_code: expected an integer" in out


def test_a_failing_cast_is_named_with_postgresqls_error_and_its_column(cdr_db, capsys):
    dialer = Dialer(cdr_db)
    dialer.cdr(cost=Decimal("0"))
    dialer.cdr()
    replace_view(cdr_db, *FAILING_CAST)

    assert main(["source", "check"]) == 1

    out = capsys.readouterr().out
    assert (
        "query    FAIL  reading the newest 1000 rows of 'cdr_webhook_source' fails: PostgreSQL: "
        'invalid input syntax for type integer: ""' in out
    )
    assert "(column hangup_cause_code: e.g. CASE WHEN hangup_cause_code ~ '^[0-9]{1,9}$'" in out
    assert "columns  ok" in out  # the type is right: only the values fail


def test_a_missing_index_is_found_on_a_tiny_table(cdr_db):
    create_feed(cdr_db)
    add_feed_row(cdr_db, "one", T0)  # one row: a plain EXPLAIN would show a Seq Scan with or without index

    finding = source_check.check_index(cdr_db, FEED)

    assert not finding.ok
    assert "CREATE INDEX CONCURRENTLY ON public.cdr_feed (created_at)" in finding.lines[0]
    cdr_db.execute(f"CREATE INDEX cdr_feed_created_at_idx ON {FEED} (created_at)")
    assert source_check.check_index(cdr_db, FEED).ok


def test_the_reference_views_index_is_found_through_its_joins(cdr_db):
    Dialer(cdr_db).cdr()
    finding = source_check.check_index(cdr_db, "cdr_webhook_source")
    assert finding.ok, finding.lines
    assert finding.lines == ("a created_at range reads dialer.cdr by its index cdr_created_at_idx",)
    cdr_db.execute("DROP INDEX dialer.cdr_created_at_idx")
    finding = source_check.check_index(cdr_db, "cdr_webhook_source")
    assert not finding.ok
    assert "CREATE INDEX CONCURRENTLY ON dialer.cdr (created_at)" in finding.lines[0]


def test_rows_that_would_be_skipped_are_counted_by_reason(cdr_db, capsys):
    create_feed(cdr_db)
    cdr_db.execute(f"CREATE INDEX ON {FEED} (created_at)")
    for second in range(5):
        add_feed_row(cdr_db, f"good-{second}", T0 + dt.timedelta(seconds=second))
    add_feed_row(cdr_db, "no-phone-1", T0 + dt.timedelta(seconds=10), phone_number=None)
    add_feed_row(cdr_db, "no-phone-2", T0 + dt.timedelta(seconds=11), phone_number=None)
    add_feed_row(cdr_db, "nan", T0 + dt.timedelta(seconds=12), cost=Decimal("NaN"))

    finding = source_check.check_sample(cdr_db, FEED, 1000)

    assert not finding.ok
    assert finding.lines == (
        "3 of the newest 8 CDRs would be skipped:",
        "       2  phone_number: must not be NULL (e.g. cdr_id 'no-phone-2')",
        "       1  cost: must be a finite number (NaN and Infinity are not JSON) (e.g. cdr_id 'nan')",
    )
    # --sample takes the newest rows only: the newest 2 have one reason.
    assert source_check.check_sample(cdr_db, FEED, 2).lines[1].strip().startswith("1  cost")


def test_a_deliverable_source_exits_0(cdr_db, capsys):
    Dialer(cdr_db).cdr()
    assert main(["source", "check", "--sample", "10"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "the source can be delivered as it stands"
    for check in ("columns", "query", "index", "sample"):
        assert re.search(rf"^{check} +ok ", out, re.M), out


def test_the_check_warns_when_no_table_behind_the_view_wakes_the_watcher_and_names_the_command(
    cdr_db, capsys
):
    Dialer(cdr_db).cdr()
    assert main(["source", "check", "--sample", "10"]) == 0  # a warning: the watcher still polls
    out = capsys.readouterr().out
    assert re.search(
        r"^notify +WARN +no NOTIFY trigger: the commit watcher finds new CDRs by polling", out, re.M
    )
    advice = next(line.strip() for line in out.splitlines() if "install-notify" in line)
    # The tables the reference view reads, the dialer's CDR table among them.
    tables = re.search(r"\(([^)]*)\): python -m cdr_webhook source install-notify TABLE$", advice)
    assert tables is not None, advice
    assert "dialer.cdr" in tables.group(1).split(", ")
    assert "public.cdr_webhook_source" not in advice  # a view is no place for the trigger

    notify.install(cdr_db, "dialer.cdr")
    assert main(["source", "check", "--sample", "10"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^notify +ok +the NOTIFY trigger on dialer.cdr wakes the commit watcher$", out, re.M), (
        out
    )


def test_the_notify_check_reads_a_table_itself_and_views_over_views(cdr_db):
    cdr_db.execute("CREATE VIEW dialer.outer_source AS SELECT * FROM public.cdr_webhook_source")
    assert notify.tables_behind(cdr_db, "dialer.cdr") == {"dialer.cdr": False}
    behind = notify.tables_behind(cdr_db, "dialer.outer_source")
    assert "dialer.cdr" in behind
    assert not any(behind.values())
    notify.install(cdr_db, "dialer.cdr")
    assert notify.tables_behind(cdr_db, "dialer.outer_source")["dialer.cdr"] is True
    assert notify.source_finding(cdr_db, "dialer.outer_source").warn is False


# -- the run: a view mistake fails it, the corrected view delivers every CDR ------------------------


def scheduled(run: int) -> RunInfo:
    start = T0 + (run - 1) * MINUTE
    return RunInfo("cdr_webhook", f"scheduled__{run}", "scheduled", start, start + MINUTE, {})


def run(conn, number: int) -> list[str]:
    mapped = claim_cdrs(
        conn, scheduled(number), SETTINGS, now=T0 + number * MINUTE, connections=configs({"cdr_webhook": {}})
    )
    return [cdr_id for item in mapped for cdr_id in item["cdr_ids"]]


def ledger_state(conn) -> tuple[list[tuple[str, str]], dt.datetime | None]:
    rows = conn.execute("SELECT cdr_id, status FROM cdr_webhook.delivery ORDER BY cdr_id").fetchall()
    mark = conn.execute("SELECT created_at FROM cdr_webhook.watermark").fetchone()
    return rows, mark[0] if mark else None


@pytest.mark.parametrize("mistake", [TEXT_CODE, FAILING_CAST], ids=["wrong type", "failing cast"])
def test_a_view_mistake_fails_the_run_and_the_corrected_view_delivers_every_cdr(cdr_db, mistake):
    dialer = Dialer(cdr_db)
    first = dialer.cdr(created_at=T0 + dt.timedelta(seconds=10))
    assert run(cdr_db, 1) == [first]
    cdr_db.execute("UPDATE cdr_webhook.delivery SET status = 'delivered'")
    before = ledger_state(cdr_db)
    # The view is changed to the mistake; the dialer writes the next interval's CDRs.
    replace_view(cdr_db, *mistake)
    interval = [
        dialer.cdr(created_at=T0 + MINUTE + dt.timedelta(seconds=s), cost=Decimal(s % 2)) for s in (5, 20, 40)
    ]

    with pytest.raises(SourceError) as failed:
        run(cdr_db, 2)

    assert "hangup_cause_code" in str(failed.value)
    assert "no CDR was queued" in str(failed.value)
    assert ledger_state(cdr_db) == before  # nothing queued, the watermark where it was

    replace_view(cdr_db, mistake[0], mistake[0])  # corrected: the reference view again
    check_source(cdr_db, "cdr_webhook_source")
    assert sorted(run(cdr_db, 3)) == sorted(interval)

    rows, _ = ledger_state(cdr_db)
    assert {cdr_id: status for cdr_id, status in rows if cdr_id in interval} == dict.fromkeys(
        interval, "queued"
    )
    assert not any(status == "skipped" for _, status in rows)
    # Each body builds from the corrected view: the code arrives as the integer it is.
    keys = cdr_db.execute(
        "SELECT cdr_id, cdr_created_at FROM cdr_webhook.delivery WHERE cdr_id = ANY(%s)", (interval,)
    ).fetchall()
    for cdr_id, row in fetch_rows(cdr_db, "cdr_webhook_source", keys).items():
        assert json.loads(encode_body(build_payload(row)))["hangup_cause_code"] == 16, cdr_id


# -- source preview: the exact requests, nothing sent, nothing written ----------------------------


@pytest.fixture
def receivers(monkeypatch):
    with Receiver(secret=SECRET, api_key="default-key") as default, Receiver() as own:
        monkeypatch.setenv(
            "AIRFLOW_CONN_CDR_WEBHOOK", http_conn(default.url, api_key="default-key", signing_secret=SECRET)
        )
        monkeypatch.setenv(
            "AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_2",
            http_conn(
                own.url + "/t0ken", api_key="key-2", leg_types=[1], headers={"X-Tenant": "acme"},
                secret_headers={"X-Token": "hdr-s3cret-77"}, oauth2_token_url="https://idp.example/token",
                oauth2_client_id="cdr", oauth2_client_secret="cl1ent-s3cret-77",
            ),
        )  # fmt: skip
        yield default, own


def test_preview_prints_the_exact_requests_and_sends_and_writes_nothing(cdr_db, receivers, capsys):
    dialer = Dialer(cdr_db)
    now = dt.datetime.now(dt.UTC)
    one = dialer.cdr(client_id=1, created_at=now - 3 * MINUTE)
    two = dialer.cdr(client_id=2, created_at=now - 2 * MINUTE)
    b_leg = dialer.cdr(client_id=2, leg_type=2, created_at=now - 2 * MINUTE + dt.timedelta(seconds=1))
    no_phone = dialer.cdr(client_id=1, created_at=now - MINUTE)
    cdr_db.execute("UPDATE dialer.cdr SET phone_number = '' WHERE id = %s", (no_phone,))
    outside = dialer.cdr(client_id=1, created_at=now - 30 * MINUTE)

    start = (now - 10 * MINUTE).isoformat()
    assert main(["source", "preview", "--from", start]) == 0

    out = capsys.readouterr().out
    keys = cdr_db.execute("SELECT cdr_id, created_at FROM cdr_webhook_source").fetchall()
    rows = fetch_rows(cdr_db, "cdr_webhook_source", keys)
    for cdr_id in (one, two):
        assert encode_body(build_payload(rows[cdr_id])).decode() in out.splitlines()
    assert f"=== CDR {one} -> cdr_webhook (http://127.0.0.1:" in out
    assert f"=== CDR {two} -> cdr_webhook_client_2 (http://127.0.0.1:" in out
    assert "filtered out by cdr_webhook_client_2 extra leg_types=[1]: leg_type is 2" in out
    assert "column phone_number = '': must not be empty" in out
    assert outside not in out
    assert "x-api-key: (secret, not shown)" in out
    assert "webhook-signature: v1,… (1 signature(s), computed when sent)" in out
    # client 2's own headers, its secret one masked, and where its bearer token will come from (no fetch).
    assert "X-Tenant: acme" in out
    assert "X-Token: (secret, not shown)" in out
    assert "authorization: Bearer (OAuth2 access token from https://idp.example, fetched when sent)" in out
    for secret in ("default-key", "key-2", SECRET, "t0ken", "hdr-s3cret-77", "cl1ent-s3cret-77"):
        assert secret not in out
    assert "4 CDR(s) created in" in out
    assert "2 request(s) a run would send, 2 not sent" in out
    default, own = receivers
    assert default.received() == []
    assert own.received() == []
    assert cdr_db.execute("SELECT to_regclass('cdr_webhook.delivery')").fetchone() == (None,)
    assert b_leg in out


def test_preview_refuses_a_source_a_run_would_refuse(cdr_db, receivers, capsys):
    Dialer(cdr_db).cdr()
    replace_view(cdr_db, *TEXT_CODE)
    assert main(["source", "preview", "--from", (T0 - MINUTE).isoformat(), "--to", T0.isoformat()]) == 1
    assert "column hangup_cause_code is text" in capsys.readouterr().out


def test_preview_with_the_client_option_shows_only_that_client(cdr_db, receivers, capsys):
    dialer = Dialer(cdr_db)
    now = dt.datetime.now(dt.UTC)
    one = dialer.cdr(client_id=1, created_at=now - MINUTE)
    two = dialer.cdr(client_id=2, created_at=now - MINUTE)
    assert main(["source", "preview", "--from", (now - 5 * MINUTE).isoformat(), "--client", "2"]) == 0
    out = capsys.readouterr().out
    assert two in out
    assert one not in out


def test_settings_source_relation_is_what_source_check_reads(cdr_db, settings_env, capsys):
    create_feed(cdr_db)
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__SOURCE_RELATION", FEED)
    assert main(["source", "check"]) == 1  # no index, no rows
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"source relation {FEED}"
    assert "CREATE INDEX CONCURRENTLY ON public.cdr_feed (created_at)" in out


# -- the relation's name: the check and the queries read the same relation ------------------------


@pytest.mark.parametrize(
    ("create", "setting"),
    [
        ("CREATE VIEW Public.Mixed AS SELECT * FROM cdr_webhook_source", "Public.Mixed"),  # folds
        ('CREATE VIEW public."Mixed" AS SELECT * FROM cdr_webhook_source', 'public."Mixed"'),  # kept
    ],
    ids=["unquoted folds", "quoted keeps its case"],
)
def test_the_check_and_the_queries_read_the_relation_the_setting_names(cdr_db, create, setting):
    dialer = Dialer(cdr_db)
    cdr_db.execute(create)
    cdr = dialer.cdr(created_at=T0 + MINUTE + dt.timedelta(seconds=5))
    settings = Settings(lag_seconds=60, source_relation=setting)

    check_source(cdr_db, setting)  # the check finds it ...
    mapped = claim_cdrs(  # ... and the run reads the same relation: it queues and takes the CDR
        cdr_db, scheduled(2), settings, now=T0 + 2 * MINUTE, connections=configs({"cdr_webhook": {}})
    )
    assert [cdr_id for item in mapped for cdr_id in item["cdr_ids"]] == [cdr]


def test_a_name_that_folds_to_no_relation_fails_the_check_not_the_queries(cdr_db):
    cdr_db.execute('CREATE VIEW public."Mixed" AS SELECT * FROM cdr_webhook_source')
    with pytest.raises(SourceError, match="source relation 'Public.Mixed' does not exist"):
        check_source(cdr_db, "Public.Mixed")  # public.mixed: the queries would not find it either


# -- the fields: NULL shares, values, and a conversion that matches nothing -------------------------

#: The docs' old leg conversion meeting a dialer that writes something else: every leg_type NULL.
CASE_SENSITIVE_LEG = (
    "cdr.leg_type::integer ",
    "CASE cdr.leg_type::text WHEN 'A' THEN 1 WHEN 'B' THEN 2 END ",
)


def test_a_field_the_view_computes_null_in_every_row_is_warned(cdr_db, capsys):
    dialer = Dialer(cdr_db)
    for client in (1, 1, 2):
        dialer.cdr(client_id=client)
    replace_view(cdr_db, *CASE_SENSITIVE_LEG)

    status = main(["source", "check", "--sample", "10"])

    out = capsys.readouterr().out
    assert status == 0  # every CDR still maps: a warning, not a failure
    assert re.search(r"^fields +WARN +the newest 3 rows, field by field", out, re.M), out
    assert re.search(r"^ +leg_type +100% NULL  no value$", out, re.M), out
    assert re.search(r"^ +client_id +0% NULL  2 distinct: 1 ×2, 2$", out, re.M), out
    assert re.search(r"^ +cdr_id +0% NULL  3 distinct: ", out, re.M), out
    warnings = [line.strip() for line in out.splitlines() if line.strip().startswith("warning: ")]
    assert len(warnings) == 1, out
    assert warnings[0].startswith("warning: leg_type is NULL in all 3 sampled rows")


def test_a_field_written_as_null_on_purpose_is_not_warned_and_shares_are_counted(cdr_db):
    dialer = Dialer(cdr_db)
    for _ in range(4):
        dialer.cdr()
    replace_view(cdr_db, "cdr.amd_status::integer ", "NULL::integer ")
    cdr_db.execute("UPDATE dialer.cdr SET cost = NULL WHERE id IN (SELECT id FROM dialer.cdr LIMIT 1)")

    findings = {f.check: f for f in source_check.run_checks(cdr_db, "cdr_webhook_source", sample=10)}

    fields = findings["fields"]
    assert fields.ok
    assert not fields.warn, fields.lines
    lines = {line.split()[0]: line for line in fields.lines[1:]}
    assert "100% NULL  no value" in lines["amd_status"]
    assert " 25% NULL  1 distinct: " in lines["cost"]
    assert "  0% NULL" in lines["leg_type"]
    # hangup_cause is NULL in the dialer's rows and sent named from its code: no warning either.
    assert lines["hangup_cause"].endswith("(sent named from hangup_cause_code)")
