from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pytest

from cdr_webhook.payload import PAYLOAD_FIELDS, InvalidCdr, Unloadable, build_payload, encode_body
from tests.payloads import assert_valid_payload, source_row


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
