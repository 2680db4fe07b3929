"""The source columns' type rules: what fails a run, what only warns, and the cast each message names."""

from __future__ import annotations

import pytest

from cdr_webhook.source_types import RULES, check_types, suggest_cast

REFERENCE = {
    **dict.fromkeys(RULES, "text"),
    "client_id": "bigint",
    "campaign_id": "bigint",
    "leg_type": "integer",
    "amd_status": "integer",
    "hangup_cause_code": "integer",
    "list_phonebook_id": "bigint[]",
    "list_phonebook_name": "text[]",
    "cost": "numeric",
    "billed_duration": "integer",
    "incremental_duration": "integer",
    "call_date": "timestamp with time zone",
    "created_at": "timestamp with time zone",
}


def test_the_reference_views_types_pass():
    assert check_types(REFERENCE) == []


def test_a_text_code_fails_with_a_cast_that_cannot_fail():
    (problem,) = check_types({**REFERENCE, "hangup_cause_code": "text"})
    assert problem.fatal
    assert problem.cast == "CASE WHEN hangup_cause_code ~ '^[0-9]{1,9}$' THEN hangup_cause_code::integer END"
    assert "column hangup_cause_code is text" in problem.message


def test_a_timestamp_without_time_zone_fails_for_both_dates():
    problems = check_types(
        {**REFERENCE, "call_date": "timestamp without time zone", "created_at": "timestamp without time zone"}
    )
    assert [(p.column, p.fatal, p.cast) for p in problems] == [
        ("call_date", True, "call_date AT TIME ZONE 'UTC'"),
        ("created_at", True, "created_at AT TIME ZONE 'UTC'"),
    ]


def test_a_numeric_integer_field_warns_and_does_not_fail():
    (problem,) = check_types({**REFERENCE, "campaign_id": "numeric"})
    assert not problem.fatal
    assert "only some values map" in problem.message


@pytest.mark.parametrize("found", ["numeric", "double precision", "jsonb"])
def test_client_id_must_be_an_integer_type_it_routes_in_sql(found):
    # A fraction there matched no route (the CDR was never queued); beyond a bigint every run failed.
    (problem,) = check_types({**REFERENCE, "client_id": found})
    assert problem.fatal
    if found != "jsonb":
        assert problem.cast.startswith("CASE WHEN client_id = trunc(client_id) AND client_id BETWEEN")


def test_conversions_the_docs_name():
    assert suggest_cast("billed_duration", "interval") == "EXTRACT(EPOCH FROM billed_duration)"
    assert suggest_cast("call_date", "bigint") == "to_timestamp(call_date)"
    assert suggest_cast("list_phonebook_name", "text") == "string_to_array(list_phonebook_name, ',')"
    assert (
        suggest_cast("list_phonebook_id", "bigint") == "array_remove(ARRAY[list_phonebook_id::bigint], NULL)"
    )
    assert suggest_cast("amd_status", "boolean") == "CASE WHEN amd_status THEN 1 ELSE 0 END"


def test_text_fields_take_uuids_integers_and_enums_as_the_mapping_does():
    for found in ("uuid", "bigint", "enum", "character varying"):
        assert check_types({**REFERENCE, "cdr_id": found}) == []
    (problem,) = check_types({**REFERENCE, "cdr_id": "numeric"})
    assert problem.fatal


def test_a_text_client_id_points_to_a_mapping_table_and_names_the_column_as_the_users():
    [problem] = check_types({**REFERENCE, "client_id": "text"})
    assert "client_id inside it standing for your own column" in problem.message
    assert "map it to an integer through a table of yours" in problem.message
    [other] = check_types({**REFERENCE, "hangup_cause_code": "text"})
    assert "standing for your own column" in other.message
    assert "table of yours" not in other.message
