"""Property tests of the payload mapping: every value the schema allows goes out and reads back the same.

Hypothesis draws source rows of every type each column may hold (text without NUL, which PostgreSQL
text cannot store; integers of a bigint; finite numbers as int, float and Decimal; timestamps in any
offset); the body is parsed back and compared field by field, and validated against the JSON Schema.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from cdr_webhook.payload import MAX_DURATION_SECONDS, PAYLOAD_FIELDS, build_payload, encode_body
from cdr_webhook.q850 import cause_name
from tests.support.payloads import assert_valid_payload, source_row

# PostgreSQL text holds any Unicode but NUL, and UTF-8 has no lone surrogates.
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)
BIGINT = st.integers(min_value=-(2**63), max_value=2**63 - 1)
DECIMALS = st.decimals(
    allow_nan=False, allow_infinity=False, places=None, min_value=-(10**20), max_value=10**20
)
NUMBERS = st.one_of(BIGINT, st.floats(allow_nan=False, allow_infinity=False), DECIMALS)
# A duration: from 0 to a year (longer is no call's).
NON_NEGATIVE = st.one_of(
    st.integers(min_value=0, max_value=MAX_DURATION_SECONDS),
    st.floats(min_value=0, max_value=MAX_DURATION_SECONDS, allow_nan=False, allow_infinity=False),
    st.decimals(min_value=0, max_value=MAX_DURATION_SECONDS, allow_nan=False, allow_infinity=False),
)
OFFSETS = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda m: dt.timezone(dt.timedelta(minutes=m))
)
CALL_DATES = st.datetimes(
    min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30), timezones=OFFSETS | st.just(dt.UTC)
)


@st.composite
def rows(draw: st.DrawFn) -> dict[str, object]:
    phonebooks = draw(st.lists(st.tuples(BIGINT, TEXT), max_size=5))
    nullable = lambda strategy: st.none() | strategy  # noqa: E731
    return source_row(
        client_id=draw(BIGINT),
        cdr_id=draw(TEXT.filter(bool)),
        callerid=draw(nullable(TEXT)),
        callrequest_id=draw(nullable(TEXT)),
        call_id=draw(nullable(TEXT)),
        campaign_id=draw(nullable(BIGINT)),
        campaign_name=draw(nullable(TEXT)),
        leg_type=draw(nullable(BIGINT)),
        phone_number=draw(TEXT.filter(bool)),
        list_phonebook_id=[pid for pid, _ in phonebooks],
        list_phonebook_name=[name for _, name in phonebooks],
        gateway=draw(nullable(TEXT)),
        amd_status=draw(nullable(BIGINT)),
        hangup_cause_code=draw(nullable(st.integers(min_value=0, max_value=127))),
        hangup_cause=draw(nullable(TEXT)),
        cost=draw(nullable(NUMBERS)),
        billed_duration=draw(nullable(NON_NEGATIVE)),
        incremental_duration=draw(nullable(NON_NEGATIVE)),
        call_date=draw(CALL_DATES),
    )


def same_number(sent: object, received: object) -> bool:
    if sent is None:
        return received is None
    exact = Decimal(repr(sent)) if isinstance(sent, float) else Decimal(sent)
    return isinstance(received, (int, Decimal)) and Decimal(received) == exact


@settings(max_examples=100, deadline=None)
@given(rows())
def test_every_allowed_row_round_trips_through_the_body(row):
    body = encode_body(build_payload(row))
    received = json.loads(body.decode("utf-8"), parse_float=Decimal)

    assert tuple(received) == PAYLOAD_FIELDS
    for field in (
        "cdr_id",
        "callerid",
        "callrequest_id",
        "call_id",
        "campaign_name",
        "phone_number",
        "gateway",
    ):
        assert received[field] == row[field], field
    for field in ("client_id", "campaign_id", "leg_type", "amd_status", "hangup_cause_code"):
        assert received[field] == row[field], field
        assert type(received[field]) is type(row[field]), field
    for field in ("cost", "billed_duration", "incremental_duration"):
        assert same_number(row[field], received[field]), (field, row[field], received[field])
    assert received["list_phonebook_id"] == row["list_phonebook_id"]
    assert received["list_phonebook_name"] == row["list_phonebook_name"]
    expected_cause = (
        row["hangup_cause"] if row["hangup_cause"] is not None else cause_name(row["hangup_cause_code"])
    )
    assert received["hangup_cause"] == expected_cause
    call_date = dt.datetime.fromisoformat(received["call_date"])
    assert call_date == row["call_date"]  # the same instant
    assert call_date.utcoffset() == dt.timedelta(0)  # always written in UTC


@settings(max_examples=50, deadline=None)
@given(rows())
def test_every_allowed_row_gives_a_schema_valid_payload(row):
    assert_valid_payload(json.loads(encode_body(build_payload(row))))
