"""Helpers shared by tests: a complete source row, and the payload JSON Schema check."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "plugins" / "cdr_webhook" / "payload.schema.json"
_VALIDATOR = jsonschema.Draft202012Validator(
    json.loads(SCHEMA_PATH.read_text()), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)


def source_row(**overrides: Any) -> dict[str, Any]:
    """A row as psycopg returns it from cdr_webhook_source, with every column set."""
    row: dict[str, Any] = {
        "client_id": 7,
        "cdr_id": "0b0e8f5e-3c0a-4f43-9a55-3f1d7b7d9c01",
        "callerid": "+442071838750",
        "callrequest_id": "5d0e7b7c-2f5e-4f0e-8a55-9c1f3c7d2b11",
        "call_id": "c7d0f6a4-6b1e-11ef-9a3e-0242ac120002",
        "campaign_id": 12,
        "campaign_name": "Winter renewals",
        "leg_type": 1,
        "phone_number": "+34650123456",
        "list_phonebook_id": [3, 9],
        "list_phonebook_name": ["Leads Madrid", "Renewals Q4"],
        "gateway": "sofia/gateway/carrier-eu",
        "amd_status": 1,
        "hangup_cause_code": 16,
        "hangup_cause": "NORMAL_CLEARING",
        "cost": Decimal("0.05250"),
        "billed_duration": 42,
        "incremental_duration": 60,
        "call_date": dt.datetime(2026, 11, 28, 9, 30, 5, 123456, tzinfo=dt.UTC),
        "created_at": dt.datetime(2026, 11, 28, 9, 31, tzinfo=dt.UTC),
    }
    row.update(overrides)
    return row


def assert_valid_payload(payload: Any) -> None:
    """Fail with every JSON Schema violation of one payload."""
    errors = sorted(_VALIDATOR.iter_errors(payload), key=lambda error: list(error.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
