"""Map one row of the source relation to the webhook payload (the 19 fields of the spec) and its bytes.

Pure: no Airflow, no database. A row that cannot be mapped raises :class:`InvalidCdr`, whose message
names the CDR, the column and the value, so the ledger can record why the CDR was skipped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import reprlib
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from cdr_webhook.q850 import cause_name

#: The payload's fields, in the order the spec lists them (and the order of the JSON object).
PAYLOAD_FIELDS: tuple[str, ...] = (
    "client_id",
    "cdr_id",
    "callerid",
    "callrequest_id",
    "call_id",
    "campaign_id",
    "campaign_name",
    "leg_type",
    "phone_number",
    "list_phonebook_id",
    "list_phonebook_name",
    "gateway",
    "amd_status",
    "hangup_cause_code",
    "hangup_cause",
    "cost",
    "billed_duration",
    "incremental_duration",
    "call_date",
)

#: The columns the source relation must expose: the payload fields plus ``created_at``.
SOURCE_COLUMNS: tuple[str, ...] = (*PAYLOAD_FIELDS, "created_at")

_REQUIRED = frozenset({"client_id", "cdr_id", "phone_number", "call_date"})
_STRINGS = ("cdr_id", "callerid", "callrequest_id", "call_id", "campaign_name", "phone_number", "gateway")
_INTEGERS = ("client_id", "campaign_id", "leg_type", "amd_status", "hangup_cause_code")
_NUMBERS = ("cost", "billed_duration", "incremental_duration")
_NON_NEGATIVE = frozenset({"billed_duration", "incremental_duration"})
#: The integers a receiver's integer type can hold: a signed 64-bit one (PostgreSQL's bigint).
_INTEGER_RANGE = (-(2**63), 2**63 - 1)
#: A call lasts less than a year; a longer duration is a unit mix-up (milliseconds) or garbage.
MAX_DURATION_SECONDS = 365 * 24 * 3600
#: Why a date PostgreSQL holds and the payload cannot (years outside 1-9999 once in UTC) skips its CDR.
OUT_OF_RANGE = "is outside the range of dates a payload can carry"
#: The smallest ``max_payload_bytes``: a body of the 19 fields with short values is about 400 bytes.
MIN_PAYLOAD_BYTES = 1024


def _value_repr() -> reprlib.Repr:
    shown = reprlib.Repr()
    shown.maxstring = shown.maxother = 80
    shown.maxlong = 40
    shown.maxlist = shown.maxtuple = shown.maxset = shown.maxdict = 5
    shown.maxlevel = 3
    return shown


_VALUE_REPR = _value_repr()


def shown(value: object) -> str:
    """
    A bounded, single-line rendering of a source value for a reason, a log line or the page.

    ``repr`` of a slice only (a 1 MB string or a 100,000-element array costs no more than a short
    one), so control, bidi, line-separator and surrogate characters are escaped (``\\n``,
    ``\\u202e``): a reason cannot forge a log line or reorder the text around it. A long text or array
    says its length.
    """
    text = _VALUE_REPR.repr(value)
    if isinstance(value, (str, bytes)) and len(value) > _VALUE_REPR.maxstring:
        return f"{text} ({len(value)} characters)"
    if isinstance(value, (list, tuple)) and len(value) > _VALUE_REPR.maxlist:
        return f"{text} ({len(value)} elements)"
    return text


@dataclasses.dataclass(frozen=True)
class Unloadable:
    """
    A source value the database driver could not turn into a Python value, as PostgreSQL wrote it.

    PostgreSQL's dates reach from 4713 BC to 294276 AD and include ``infinity``; Python's stop at
    years 1 and 9999 (and its JSON reader at some thousand levels of nesting). The reader puts this
    marker in the row instead of failing the whole query, so only the CDR that holds such a value is
    skipped, with ``problem``.
    """

    raw: str
    problem: str = OUT_OF_RANGE


@dataclasses.dataclass(frozen=True)
class Ambiguous:
    """
    The values of one column that differ between source rows with the same cdr_id and created_at.

    No rule can say which of them is the CDR, so the reader marks the column and the CDR is skipped
    with ``problem`` (which names every differing column) rather than one of the rows being sent.
    """

    values: tuple[Any, ...]
    problem: str


class InvalidCdr(ValueError):
    """A source row that cannot become a payload; the message says which column and why."""

    def __init__(self, cdr_id: object, column: str, value: object, problem: str) -> None:
        self.cdr_id = cdr_id
        self.column = column
        self.value = value
        self.problem = problem
        super().__init__(f"CDR {shown(cdr_id)}: column {column} = {shown(value)}: {problem}")


def build_payload(row: Mapping[str, Any]) -> dict[str, Any]:
    """
    Return the payload of one source row: every field present, each of the spec's JSON type.

    Numbers from NUMERIC columns stay :class:`~decimal.Decimal` so that :func:`encode_body` writes
    them exactly; a NULL ``hangup_cause`` with a known Q.850 ``hangup_cause_code`` gets its name.
    """
    missing = [column for column in PAYLOAD_FIELDS if column not in row]
    if missing:
        raise InvalidCdr(row.get("cdr_id"), missing[0], None, "column missing from the source relation")
    cdr_id = row["cdr_id"]
    for column in PAYLOAD_FIELDS:
        if isinstance(row[column], Ambiguous):
            raise InvalidCdr(cdr_id, "cdr_id", cdr_id, row[column].problem)
    for column in PAYLOAD_FIELDS:
        if isinstance(row[column], Unloadable):
            raise InvalidCdr(cdr_id, column, row[column].raw, row[column].problem)
    payload: dict[str, Any] = {}
    for column in PAYLOAD_FIELDS:
        value = row[column]
        if value is None and column in _REQUIRED:
            raise InvalidCdr(cdr_id, column, value, "must not be NULL")
        if column in _STRINGS:
            payload[column] = _string(cdr_id, column, value)
        elif column in _INTEGERS:
            payload[column] = _integer(cdr_id, column, value)
        elif column in _NUMBERS:
            payload[column] = _number(cdr_id, column, value)
        elif column == "call_date":
            payload[column] = _timestamp(cdr_id, column, value)
        elif column == "hangup_cause":
            payload[column] = _string(cdr_id, column, value)
        else:
            payload[column] = value  # the two phonebook arrays, checked together below
    if payload["cdr_id"] == "":
        raise InvalidCdr(cdr_id, "cdr_id", cdr_id, "must not be empty")
    if payload["phone_number"] == "":
        raise InvalidCdr(cdr_id, "phone_number", "", "must not be empty")
    payload["list_phonebook_id"], payload["list_phonebook_name"] = _phonebooks(
        cdr_id, row["list_phonebook_id"], row["list_phonebook_name"]
    )
    if payload["hangup_cause"] is None:
        payload["hangup_cause"] = cause_name(payload["hangup_cause_code"])
    return payload


def sized_body(payload: Mapping[str, Any], max_bytes: int) -> bytes:
    """
    The body of ``payload``; :class:`InvalidCdr` when it is over ``max_bytes`` (``max_payload_bytes``).

    The reason names the field that takes most of the body, with its (bounded) value: a 1 MB
    campaign name or a 100,000-element phonebook list is what to fix in the source.
    """
    body = encode_body(payload)
    if len(body) <= max_bytes:
        return body
    sizes = {field: len(_json_value(value).encode("utf-8")) for field, value in payload.items()}
    largest = max(sizes, key=lambda field: sizes[field])
    raise InvalidCdr(
        payload.get("cdr_id"),
        largest,
        payload[largest],
        f"makes the body {len(body)} bytes ({sizes[largest]} of them this field), over max_payload_bytes "
        f"= {max_bytes}: not sent",
    )


def encode_body(payload: Mapping[str, Any]) -> bytes:
    """
    Return the exact bytes to POST: compact UTF-8 JSON, fields in spec order.

    A Decimal is written with its own digits (``0.0525`` stays ``0.0525``, never
    ``0.052500000000000005``); text is written as is, not \\u-escaped.
    """
    parts = [f"{json.dumps(key)}:{_json_value(value)}" for key, value in payload.items()]
    return ("{" + ",".join(parts) + "}").encode("utf-8")


#: json.dumps with options builds an encoder per call: one, made once, encodes every value.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _json_value(value: Any) -> str:
    if isinstance(value, Decimal):
        return str(value)
    return _ENCODE(value)


def _string(cdr_id: object, column: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _text(cdr_id, column, value)
    if isinstance(value, (int, uuid.UUID)) and not isinstance(value, bool):
        return str(value)
    raise InvalidCdr(cdr_id, column, value, f"expected text, got {type(value).__name__}")


#: A lone UTF-16 surrogate: a json column may hold one as ``\ud800``; UTF-8 cannot encode it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(cdr_id: object, column: str, value: str) -> str:
    """
    Text as it is (bidi overrides, emoji, tabs and all: the spec sends it byte-exact), except what
    cannot be sent: NUL, which PostgreSQL text cannot hold and many receivers refuse (jsonb among
    them), and a lone surrogate, which is not UTF-8. Only a json column can carry either.
    """
    nul = value.find("\x00")
    if nul >= 0:
        raise InvalidCdr(cdr_id, column, value, f"contains a NUL character (U+0000) at index {nul}")
    surrogate = _SURROGATE.search(value)
    if surrogate:
        raise InvalidCdr(
            cdr_id,
            column,
            value,
            f"contains a lone surrogate (U+{ord(surrogate.group()):04X}) at index {surrogate.start()}, "
            "which UTF-8 cannot encode",
        )
    return value


def _in_range(cdr_id: object, column: str, value: int) -> int:
    low, high = _INTEGER_RANGE
    if not low <= value <= high:
        raise InvalidCdr(cdr_id, column, value, "is beyond the 64-bit integer a receiver can hold")
    return value


def _integer(cdr_id: object, column: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidCdr(cdr_id, column, value, "expected an integer, got a boolean")
    if isinstance(value, int):
        return _in_range(cdr_id, column, value)
    if isinstance(value, (Decimal, float)) and _finite(value) and value == int(value):
        return _in_range(cdr_id, column, int(value))
    raise InvalidCdr(cdr_id, column, value, "expected an integer")


def _number(cdr_id: object, column: str, value: Any) -> int | Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise InvalidCdr(cdr_id, column, value, f"expected a number, got {type(value).__name__}")
    if not _finite(value):
        raise InvalidCdr(cdr_id, column, value, "must be a finite number (NaN and Infinity are not JSON)")
    if column in _NON_NEGATIVE and value < 0:
        raise InvalidCdr(cdr_id, column, value, "must not be negative")
    if column in _NON_NEGATIVE and value > MAX_DURATION_SECONDS:
        raise InvalidCdr(
            cdr_id, column, value, f"is longer than a year ({MAX_DURATION_SECONDS} seconds): not a call's"
        )
    if isinstance(value, float):
        # repr gives the shortest digits that read back as the same float: no binary noise.
        value = Decimal(repr(value))
    if isinstance(value, Decimal):
        if value == 0:
            return 0  # also turns -0 into 0
        if value == value.to_integral_value():
            return int(value)
        # NUMERIC(12,5) 0.05250 is written 0.0525. Not Decimal.normalize(): it rounds to 28 digits.
        return Decimal(format(value, "f").rstrip("0"))
    return value


def _finite(value: float | Decimal) -> bool:
    return value.is_finite() if isinstance(value, Decimal) else math.isfinite(value)


def _timestamp(cdr_id: object, column: str, value: Any) -> str:
    if not isinstance(value, dt.datetime):
        raise InvalidCdr(cdr_id, column, value, "expected a timestamp with time zone")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidCdr(
            cdr_id,
            column,
            value,
            "has no time zone; expose it as timestamptz in the source view "
            "(e.g. call_date AT TIME ZONE 'UTC')",
        )
    try:
        return value.astimezone(dt.UTC).isoformat()
    except OverflowError:  # year 1 or 9999 a few hours beyond Python's range once in UTC
        raise InvalidCdr(cdr_id, column, value, OUT_OF_RANGE) from None


def _phonebooks(cdr_id: object, ids: Any, names: Any) -> tuple[list[int], list[str]]:
    ids = [] if ids is None else ids
    names = [] if names is None else names
    for column, value in (("list_phonebook_id", ids), ("list_phonebook_name", names)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise InvalidCdr(cdr_id, column, value, "expected an array")
    if len(ids) != len(names):
        raise InvalidCdr(
            cdr_id,
            "list_phonebook_name",
            names,
            f"has {len(names)} elements but list_phonebook_id has {len(ids)}; they must pair up",
        )
    checked_ids = []
    for element in ids:
        if element is None:
            raise InvalidCdr(cdr_id, "list_phonebook_id", ids, "has a NULL element")
        checked_ids.append(_integer(cdr_id, "list_phonebook_id", element))
    checked_names = []
    for element in names:
        if element is None:
            raise InvalidCdr(cdr_id, "list_phonebook_name", names, "has a NULL element")
        checked_names.append(_string(cdr_id, "list_phonebook_name", element))
    return checked_ids, checked_names  # type: ignore[return-value]
