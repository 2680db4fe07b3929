"""Good and hostile source rows, in a table of the loosest column types the source contract accepts.

``public.hostile_feed`` keeps text fields in ``json`` columns (a json column carries ``\\u0000`` and
lone surrogates, which text refuses), integer fields but ``client_id`` in ``numeric`` (40 digits fit)
and the phonebook ids in ``json`` (any length, any element). ``call_date`` and ``created_at`` must
be timestamptz: a naive timestamp is given one by PostgreSQL at insert (the session's TimeZone).
"""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datetime as dt

FEED = "public.hostile_feed"
#: The session TimeZone rows are written in: a naive timestamp is read as Madrid's wall time.
INSERT_TIME_ZONE = "Europe/Madrid"

_COLUMNS = {
    "client_id": "bigint",
    "cdr_id": "text",
    "callerid": "json",
    "callrequest_id": "text",
    "call_id": "text",
    "campaign_id": "numeric",
    "campaign_name": "json",
    "leg_type": "integer",
    "phone_number": "text",
    "list_phonebook_id": "json",
    "list_phonebook_name": "text[]",
    "gateway": "text",
    "amd_status": "integer",
    "hangup_cause_code": "numeric",
    "hangup_cause": "json",
    "cost": "numeric",
    "billed_duration": "numeric",
    "incremental_duration": "double precision",
    "call_date": "timestamptz",
    "created_at": "timestamptz",
}
_JSON = frozenset(column for column, kind in _COLUMNS.items() if kind == "json")

MB = "m" * 1_048_576
HUNDRED_K = list(range(100_000))


class RawJson(str):
    """JSON text written as it is (Python's own writer cannot nest 5,000 deep)."""


@dataclasses.dataclass(frozen=True)
class Bad:
    """A kind of bad CDR: its values, and the column its reason must name."""

    name: str
    values: dict[str, Any]
    column: str


#: Every kind of bad value tried; the volume test cycles through them.
BAD_KINDS = (
    Bad("null-client", {"client_id": None}, "client_id"),
    Bad("null-phone", {"phone_number": None}, "phone_number"),
    Bad("empty-phone", {"phone_number": ""}, "phone_number"),
    Bad("null-call-date", {"call_date": None}, "call_date"),
    Bad("null-cdr-id", {"cdr_id": None}, "cdr_id"),
    Bad("nan-cost", {"cost": Decimal("NaN")}, "cost"),
    Bad("inf-cost", {"cost": Decimal("Infinity")}, "cost"),
    Bad("minus-inf-cost", {"cost": Decimal("-Infinity")}, "cost"),
    Bad("inf-duration", {"incremental_duration": float("inf")}, "incremental_duration"),
    Bad("negative-duration", {"billed_duration": Decimal(-5)}, "billed_duration"),
    Bad("absurd-duration", {"billed_duration": Decimal(10**12)}, "billed_duration"),
    Bad("absurd-float-duration", {"incremental_duration": 1e300}, "incremental_duration"),
    Bad("40-digit-campaign", {"campaign_id": Decimal(10**39)}, "campaign_id"),
    Bad("40-digit-cause", {"hangup_cause_code": Decimal(-(10**39))}, "hangup_cause_code"),
    Bad(
        "40-digit-phonebook-id",
        {"list_phonebook_id": [1, 10**39], "list_phonebook_name": ["a", "b"]},
        "list_phonebook_id",
    ),  # fmt: skip
    Bad("uneven-arrays", {"list_phonebook_id": [1, 2], "list_phonebook_name": ["a"]}, "list_phonebook_name"),
    Bad(
        "null-in-array",
        {"list_phonebook_id": [1, None], "list_phonebook_name": ["a", "b"]},
        "list_phonebook_id",
    ),  # fmt: skip
    Bad("100k-unpaired", {"list_phonebook_id": HUNDRED_K, "list_phonebook_name": []}, "list_phonebook_name"),
    Bad(
        "100k-paired",
        {"list_phonebook_id": HUNDRED_K, "list_phonebook_name": [str(i) for i in HUNDRED_K]},
        "list_phonebook_name",
    ),  # fmt: skip  # a body of ~1.2 MB: over max_payload_bytes
    Bad("nul-in-text", {"campaign_name": "evil\x00name"}, "campaign_name"),
    Bad("lone-surrogate", {"callerid": "+34\ud800"}, "callerid"),
    Bad("1-mb-json-text", {"campaign_name": MB}, "campaign_name"),
    Bad("1-mb-text", {"gateway": MB}, "gateway"),
    Bad("1-mb-with-newlines", {"call_id": "forged\nERROR line\n" * 60_000}, "call_id"),
    Bad("object-as-text", {"hangup_cause": {"injected": [1, 2]}}, "hangup_cause"),
    Bad("year-0-in-utc", {"call_date": "0001-01-01 00:30:00+01"}, "call_date"),
    Bad("infinity-date", {"call_date": "infinity"}, "call_date"),
    Bad("year-10000", {"call_date": "10000-01-01 00:00:00+00"}, "call_date"),
    Bad("long-cdr-id", {"cdr_id": "L\nforged line \u202edesrever\u2028" + "L" * 300}, "cdr_id"),
    Bad("json-nested-5000-deep", {"hangup_cause": RawJson("[" * 5000 + "]" * 5000)}, "hangup_cause"),
    Bad("ambiguous-duplicate", {}, "cdr_id"),  # two rows of one cdr_id and created_at, costs differing
)


def create_feed(conn: Any) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {FEED} CASCADE")  # and a view a test made over it
    columns = ", ".join(f"{name} {kind}" for name, kind in _COLUMNS.items())
    conn.execute(f"CREATE TABLE {FEED} ({columns})")
    conn.execute(f"CREATE INDEX ON {FEED} (created_at)")


def good_row(cdr_id: str, created_at: dt.datetime, index: int, **overrides: Any) -> dict[str, Any]:
    """A valid row of client 7; ``overrides`` replace values (json columns take Python values)."""
    row = {
        "client_id": 7,
        "cdr_id": cdr_id,
        "callerid": "+442071838750",
        "callrequest_id": f"r-{index}",
        "call_id": f"c-{index}",
        "campaign_id": Decimal(12),
        "campaign_name": "Winter renewals",
        "leg_type": 1,
        "phone_number": f"+34650{index:06d}",
        "list_phonebook_id": [3, 9],
        "list_phonebook_name": ["Leads Madrid", "Renewals Q4"],
        "gateway": "sofia/gateway/carrier-eu",
        "amd_status": 1,
        "hangup_cause_code": Decimal(16),
        "hangup_cause": None,
        "cost": Decimal("0.05250"),
        "billed_duration": Decimal(42),
        "incremental_duration": 60.0,
        "call_date": "2026-11-28 09:30:05.123456+00",
        "created_at": created_at,
    }
    row.update(overrides)
    return row


def copy_rows(conn: Any, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` with COPY, json columns as JSON text, in :data:`INSERT_TIME_ZONE`."""
    names = list(_COLUMNS)
    with conn.transaction():
        conn.execute("SELECT set_config('TimeZone', %s, true)", (INSERT_TIME_ZONE,))
        with conn.cursor() as cur, cur.copy(f"COPY {FEED} ({', '.join(names)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([_json_text(row[n]) if n in _JSON else row[n] for n in names])


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, RawJson):
        return str(value)
    # ensure_ascii: NUL and lone surrogates travel as \u escapes, which the json type keeps as they are.
    return json.dumps(value, ensure_ascii=True)
