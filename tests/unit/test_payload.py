from __future__ import annotations

import datetime as dt
import json
import re
from decimal import Decimal
from pathlib import Path

import pytest

from cdr_webhook import payload as payload_module
from cdr_webhook.payload import (
    MAX_DURATION_SECONDS,
    PAYLOAD_FIELDS,
    InvalidCdr,
    Unloadable,
    build_payload,
    encode_body,
    shown,
    sized_body,
)
from tests.support.payloads import assert_valid_payload, source_row


def body_of(**overrides):
    return json.loads(encode_body(build_payload(source_row(**overrides))), parse_float=Decimal)


def test_every_field_present_in_spec_order_and_schema_valid():
    payload = json.loads(encode_body(build_payload(source_row())))
    assert tuple(payload) == PAYLOAD_FIELDS
    assert len(payload) == 19
    assert_valid_payload(payload)


def test_types_match_the_spec():
    payload = body_of()
    assert payload["client_id"] == 7
    assert payload["cdr_id"] == "0b0e8f5e-3c0a-4f43-9a55-3f1d7b7d9c01"
    assert payload["campaign_id"] == 12
    assert payload["list_phonebook_id"] == [3, 9]
    assert payload["list_phonebook_name"] == ["Leads Madrid", "Renewals Q4"]
    assert payload["billed_duration"] == 42
    assert isinstance(payload["billed_duration"], int)


def test_nullable_fields_stay_present_as_null():
    payload = body_of(callerid=None, gateway=None, amd_status=None, cost=None, campaign_name=None)
    for field in ("callerid", "gateway", "amd_status", "cost", "campaign_name"):
        assert field in payload
        assert payload[field] is None
    assert_valid_payload(json.loads(encode_body(build_payload(source_row(callerid=None, cost=None)))))


@pytest.mark.parametrize(
    ("cost", "written"),
    [
        (Decimal("0.05250"), b'"cost":0.0525,'),
        (Decimal("0.1"), b'"cost":0.1,'),
        (Decimal("12.00000"), b'"cost":12,'),
        (Decimal("-0.00000"), b'"cost":0,'),
        (
            Decimal("1234567890123456789012345.123456789012345"),
            b'"cost":1234567890123456789012345.123456789012345,',
        ),
        (0.3, b'"cost":0.3,'),
        (3, b'"cost":3,'),
    ],
)
def test_cost_is_an_exact_json_number_never_a_string(cost, written):
    body = encode_body(build_payload(source_row(cost=cost)))
    assert written in body
    assert isinstance(json.loads(body)["cost"], (int, float))


@pytest.mark.parametrize("bad", [Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"), float("nan")])
def test_non_finite_cost_is_rejected_naming_column_and_cdr(bad):
    with pytest.raises(InvalidCdr, match=r"CDR '0b0e8f5e.*column cost = .*finite number") as err:
        build_payload(source_row(cost=bad))
    assert err.value.column == "cost"


@pytest.mark.parametrize("column", ["cdr_id", "phone_number", "client_id", "call_date"])
def test_required_columns_must_not_be_null(column):
    with pytest.raises(InvalidCdr, match=f"column {column} = None: must not be NULL"):
        build_payload(source_row(**{column: None}))


def test_negative_duration_is_rejected():
    with pytest.raises(InvalidCdr, match="column billed_duration = -1: must not be negative"):
        build_payload(source_row(billed_duration=-1))


def test_phonebook_arrays_must_pair_up():
    with pytest.raises(InvalidCdr, match="has 1 elements but list_phonebook_id has 2"):
        build_payload(source_row(list_phonebook_name=["only one"]))
    with pytest.raises(InvalidCdr, match="list_phonebook_id .*NULL element"):
        build_payload(source_row(list_phonebook_id=[3, None], list_phonebook_name=["a", "b"]))


def test_null_phonebook_arrays_become_empty_arrays():
    payload = body_of(list_phonebook_id=None, list_phonebook_name=None)
    assert payload["list_phonebook_id"] == []
    assert payload["list_phonebook_name"] == []


@pytest.mark.parametrize(
    "text",
    [
        "{{ 7 * 7 }}",
        "{% raw %}x{% endraw %}",
        'quote " and \\ backslash',
        "line\nbreak\ttab",
        "Ñandú – 電話 – 📞",
        "\u202eRTL override",
    ],
)
def test_text_is_passed_through_byte_exact(text):
    body = encode_body(build_payload(source_row(callerid=text, campaign_name=text)))
    payload = json.loads(body)
    assert payload["callerid"] == text
    assert payload["campaign_name"] == text
    if text.isascii() and "\n" not in text and '"' not in text and "\\" not in text:
        assert text.encode() in body  # not escaped, not rendered


def test_known_q850_code_fills_a_null_hangup_cause():
    assert body_of(hangup_cause=None, hangup_cause_code=17)["hangup_cause"] == "USER_BUSY"
    assert body_of(hangup_cause=None, hangup_cause_code=999)["hangup_cause"] is None
    assert body_of(hangup_cause="CUSTOM_CAUSE", hangup_cause_code=17)["hangup_cause"] == "CUSTOM_CAUSE"


def test_call_date_is_rfc3339_with_offset_in_utc():
    local = dt.datetime(2026, 3, 29, 3, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    payload = body_of(call_date=local)
    assert payload["call_date"] == "2026-03-29T01:30:00+00:00"
    assert dt.datetime.fromisoformat(payload["call_date"]) == local


def test_a_date_the_driver_could_not_load_is_rejected_with_its_text():
    with pytest.raises(InvalidCdr, match="column call_date = 'infinity': is outside the range of dates"):
        build_payload(source_row(call_date=Unloadable("infinity")))


def test_a_year_1_call_date_that_leaves_the_range_in_utc_is_rejected():
    year_one = dt.datetime(1, 1, 1, 1, 0, tzinfo=dt.timezone(dt.timedelta(hours=5)))
    with pytest.raises(InvalidCdr, match="column call_date = .*outside the range of dates"):
        build_payload(source_row(call_date=year_one))


def test_naive_call_date_is_rejected_with_the_fix():
    with pytest.raises(InvalidCdr, match="no time zone; expose it as timestamptz"):
        build_payload(source_row(call_date=dt.datetime(2026, 1, 1)))


def test_integers_from_numeric_and_rejects_fractions_and_booleans():
    assert body_of(campaign_id=Decimal("12"))["campaign_id"] == 12
    with pytest.raises(InvalidCdr, match="column campaign_id = Decimal"):
        build_payload(source_row(campaign_id=Decimal("1.5")))
    with pytest.raises(InvalidCdr, match="column leg_type = True: expected an integer, got a boolean"):
        build_payload(source_row(leg_type=True))


def test_uuid_and_integer_ids_become_strings():
    import uuid

    value = uuid.UUID("0b0e8f5e-3c0a-4f43-9a55-3f1d7b7d9c01")
    assert body_of(cdr_id=value, callrequest_id=12345)["callrequest_id"] == "12345"
    assert body_of(cdr_id=value)["cdr_id"] == str(value)


def test_missing_source_column_is_named():
    row = source_row()
    del row["gateway"]
    with pytest.raises(InvalidCdr, match="column gateway = None: column missing from the source relation"):
        build_payload(row)


# Hostile values (issue #18 item 2): what is refused, what is delivered as it is, and how a reason
# shows a value.


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("campaign_name", "a\x00b", "contains a NUL character (U+0000) at index 1"),
        ("callerid", "ok\ud800", "contains a lone surrogate (U+D800) at index 2, which UTF-8 cannot encode"),
        ("list_phonebook_name", ["fine", "\udfff"], "contains a lone surrogate (U+DFFF) at index 0"),
    ],
)
def test_text_utf8_cannot_carry_is_refused_naming_column_and_position(column, value, problem):
    # Only a json column can bring these (PostgreSQL text refuses NUL, UTF-8 has no lone surrogate).
    overrides = {column: value, "list_phonebook_id": [1, 2]} if isinstance(value, list) else {column: value}
    with pytest.raises(InvalidCdr, match=re.escape(problem)) as raised:
        build_payload(source_row(**overrides))
    assert raised.value.column == column


@pytest.mark.parametrize("column", ["client_id", "campaign_id", "hangup_cause_code"])
@pytest.mark.parametrize("value", [10**39, Decimal(-(10**39)), 2**63])
def test_integers_beyond_64_bits_are_refused(column, value):
    with pytest.raises(InvalidCdr, match=f"column {column} = .*: is beyond the 64-bit integer"):
        build_payload(source_row(**{column: value}))


def test_integers_at_the_64_bit_bounds_are_sent():
    assert body_of(client_id=2**63 - 1, campaign_id=-(2**63))["client_id"] == 2**63 - 1


@pytest.mark.parametrize("column", ["billed_duration", "incremental_duration"])
def test_durations_over_a_year_are_refused_a_year_is_sent(column):
    assert body_of(**{column: MAX_DURATION_SECONDS})[column] == MAX_DURATION_SECONDS
    with pytest.raises(InvalidCdr, match=f"column {column} = 31536001: is longer than a year"):
        build_payload(source_row(**{column: MAX_DURATION_SECONDS + 1}))


@pytest.mark.parametrize(
    "text",
    [
        "\u202eevil\u202c",  # right-to-left override
        "\u2066isolate\u2069 \u200f",
        "tab\tnew\nline\r",
        "\u2028line separator",
        "zero\u200bwidth \ufeff bom",
        "\U0001f4de emoji \u0301 combining",
    ],
)
def test_odd_but_valid_text_is_sent_byte_exact(text):
    body = encode_body(build_payload(source_row(campaign_name=text)))
    assert json.loads(body)["campaign_name"] == text


@pytest.mark.parametrize(
    "value",
    [
        "x" * 1_000_000,
        "\n" * 5000,
        "\u202e" * 100,
        list(range(100_000)),
        Unloadable("infinity\n2026-01-01 forged log line"),
    ],
    ids=["1-MB", "newlines", "rtl-overrides", "100k-array", "unloadable"],
)
def test_a_reason_shows_a_value_bounded_on_one_line_with_control_and_bidi_escaped(value):
    reason = str(InvalidCdr("cdr-\n1", "campaign_name", value, "a problem"))
    assert len(reason) < 300
    assert reason.isprintable()  # no newline, no bidi control, no surrogate: one line, as it reads
    assert reason.startswith("CDR 'cdr-\\n1': column campaign_name = ")
    if isinstance(value, str) and len(value) > 80:
        assert f"({len(value)} characters)" in reason
    if isinstance(value, list):
        assert "(100000 elements)" in reason


def test_shown_keeps_short_values_as_their_repr():
    assert shown("+34650123456") == "'+34650123456'"
    assert shown(Decimal("NaN")) == "Decimal('NaN')"
    assert shown(None) == "None"


def test_a_body_over_max_payload_bytes_is_refused_naming_the_largest_field():
    payload = build_payload(source_row(campaign_name="é" * 200_000))
    body = encode_body(payload)
    assert sized_body(payload, len(body)) == body  # at the limit: sent
    with pytest.raises(InvalidCdr) as raised:
        sized_body(payload, 262_144)
    assert raised.value.column == "campaign_name"
    message = str(raised.value)
    assert (
        f"makes the body {len(body)} bytes (400002 of them this field), over max_payload_bytes = 262144"
        in (message)
    )
    assert message.endswith("not sent")
    assert len(message) < 400


def test_a_phonebook_list_of_100000_pairs_is_over_the_default_limit():
    ids = list(range(100_000))
    payload = build_payload(source_row(list_phonebook_id=ids, list_phonebook_name=[f"b{i}" for i in ids]))
    with pytest.raises(InvalidCdr, match="column list_phonebook_name = .*100000 elements.*over max_payload"):
        sized_body(payload, 262_144)


def test_the_schema_bounds_durations_as_the_mapping_does():
    schema = json.loads((Path(payload_module.__file__).parent / "payload.schema.json").read_text())
    for field in ("billed_duration", "incremental_duration"):
        assert schema["properties"][field]["maximum"] == MAX_DURATION_SECONDS
