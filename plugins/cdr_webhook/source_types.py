"""The SQL types each column of the source relation may have, and the cast to suggest when it has another.

Pure: no Airflow, no database. The rules follow what :mod:`cdr_webhook.payload` accepts from the values
psycopg loads for each type, so a column the check passes is one the mapping can carry:

* ``accepted``: every non-NULL value of the type maps (a smallint for an integer field);
* ``tolerated``: some values map and others skip their CDR (a numeric for an integer field maps when
  it is whole): the check warns, the run goes on;
* any other type: no value of it maps (text for an integer field: "expected an integer"), so a run
  over it would skip every CDR; the check fails the run instead, naming the cast to write in the view.

Type names are PostgreSQL's ``format_type`` names of the column's base type (a domain is its base
type), ``enum`` for any enum type, and ``<name>[]`` for arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cdr_webhook.payload import PAYLOAD_FIELDS, SOURCE_COLUMNS

_INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})
_TEXT_TYPES = frozenset({"text", "character varying", "character", "name", "citext", "enum"})
_JSON_TYPES = frozenset({"json", "jsonb"})
_FLOAT_TYPES = frozenset({"real", "double precision"})
# psycopg loads uuid as UUID and integers as int: the payload writes both as text.
_AS_TEXT = _TEXT_TYPES | {"uuid"} | _INTEGER_TYPES
_TIMESTAMPTZ = "timestamp with time zone"


def _arrays(types: frozenset[str]) -> frozenset[str]:
    return frozenset(f"{name}[]" for name in types)


@dataclasses.dataclass(frozen=True)
class ColumnRule:
    """What one source column must be: its kind, the types it may have, and whether it may be NULL."""

    column: str
    kind: str  # integer, number, text, timestamptz, integer array, text array
    display: str  # the types to give it, as the docs' column table writes them
    nullable: bool
    accepted: frozenset[str]
    tolerated: frozenset[str] = frozenset()

    def allows(self, type_name: str) -> bool:
        return type_name in self.accepted or type_name in self.tolerated


_INTEGER: dict[str, Any] = {
    "display": "smallint, integer or bigint",
    "accepted": _INTEGER_TYPES,
    "tolerated": frozenset({"numeric"}) | _FLOAT_TYPES | _JSON_TYPES,  # whole values only
}
_NUMBER: dict[str, Any] = {
    "display": "numeric, integer types, real or double precision",
    "accepted": _INTEGER_TYPES | _FLOAT_TYPES | {"numeric"},
    "tolerated": _JSON_TYPES,
}
_TEXT: dict[str, Any] = {"display": "text, varchar or char", "accepted": _AS_TEXT, "tolerated": _JSON_TYPES}
_KINDS = {"integer": _INTEGER, "number": _NUMBER, "text": _TEXT}

_KIND_OF = {
    "client_id": "integer",
    "campaign_id": "integer",
    "leg_type": "integer",
    "amd_status": "integer",
    "hangup_cause_code": "integer",
    "cost": "number",
    "billed_duration": "number",
    "incremental_duration": "number",
}
_NOT_NULL = frozenset({"client_id", "cdr_id", "phone_number", "call_date", "created_at"})


def _rule(column: str) -> ColumnRule:
    nullable = column not in _NOT_NULL
    if column in ("call_date", "created_at"):
        return ColumnRule(column, "timestamptz", "timestamptz", nullable, frozenset({_TIMESTAMPTZ}))
    if column == "list_phonebook_id":
        return ColumnRule(
            column,
            "integer array",
            "bigint[] or integer[]",
            True,
            _arrays(_INTEGER_TYPES),
            _arrays(frozenset({"numeric"}) | _FLOAT_TYPES) | _JSON_TYPES,
        )
    if column == "list_phonebook_name":
        return ColumnRule(
            column, "text array", "text[] or varchar[]", True, _arrays(_AS_TEXT), _arrays(_JSON_TYPES)
        )
    kind = _KIND_OF.get(column, "text")
    spec = _KINDS[kind]
    # client_id routes the CDR inside SQL (joined with the routes as a bigint), before any row is
    # mapped: a fraction there matched no route and was never queued, a value beyond a bigint failed
    # every run. It must be an integer type; the other integer fields are mapped in Python, row by row.
    tolerated = frozenset() if column == "client_id" else spec.get("tolerated", frozenset())
    return ColumnRule(column, kind, spec["display"], nullable, spec["accepted"], tolerated)


#: The rule of every column of the source relation, in its order: the 19 payload fields, created_at.
RULES: dict[str, ColumnRule] = {column: _rule(column) for column in SOURCE_COLUMNS}

assert tuple(RULES) == (*PAYLOAD_FIELDS, "created_at")


@dataclasses.dataclass(frozen=True)
class TypeProblem:
    """A column whose type cannot carry its field (``fatal``) or carries only some of its values."""

    column: str
    found: str
    fatal: bool
    cast: str

    @property
    def message(self) -> str:
        rule = RULES[self.column]
        # The cast names the view's column: in the view, the expression is the dialer's own column.
        own = f" ({self.column} inside it standing for your own column)"
        if self.column == "client_id" and self.found in _TEXT_TYPES:
            own += (
                "; if the tenant key is not a number (a domain, a name), this makes every row NULL: map "
                "it to an integer through a table of yours instead (docs/your-database.md, A text tenant key)"
            )
        if self.fatal:
            return (
                f"column {self.column} is {self.found}, which cannot carry the payload's {self.column} "
                f"(it needs {rule.display}): write it in the view as {self.cast} AS {self.column}{own}"
            )
        return (
            f"column {self.column} is {self.found}: only some values map ({rule.kind}), the others skip "
            f"their CDR; to be sure, write it in the view as {self.cast} AS {self.column}{own}"
        )


def check_types(types: dict[str, str]) -> list[TypeProblem]:
    """Return the problems of the columns ``types`` (column name -> type name) has; missing ones are not."""
    problems = []
    for column, rule in RULES.items():
        found = types.get(column)
        if found is None or found in rule.accepted:
            continue
        problems.append(TypeProblem(column, found, not rule.allows(found), suggest_cast(column, found)))
    return problems


_TEXT_CASTS = {
    "integer": "CASE WHEN {c} ~ '^[0-9]{{1,9}}$' THEN {c}::integer END",
    "number": "CASE WHEN {c} ~ '^-?[0-9]+(\\.[0-9]+)?$' THEN {c}::numeric END",
    "timestamptz": "{c}::timestamptz",
    "integer array": "string_to_array({c}, ',')::bigint[]",
    "text array": "string_to_array({c}, ',')",
}
_DEFAULT_CASTS = {
    "integer": "{c}::integer",
    "number": "{c}::numeric",
    "text": "{c}::text",
    "timestamptz": "{c}::timestamptz",
    "integer array": "{c}::bigint[]",
    "text array": "{c}::text[]",
}


def suggest_cast(column: str, found: str) -> str:
    """The expression to write in the view so that ``column`` of type ``found`` carries its field."""
    kind = RULES[column].kind
    template = _DEFAULT_CASTS[kind]
    if found in _TEXT_TYPES and kind in _TEXT_CASTS:
        # A plain cast fails the whole query on one bad value: this one gives NULL for it instead.
        template = _TEXT_CASTS[kind]
    elif kind == "timestamptz" and found == "timestamp without time zone":
        template = "{c} AT TIME ZONE 'UTC'"  # the zone the dialer writes its local times in
    elif kind == "timestamptz" and found == "date":
        template = "{c}::timestamp AT TIME ZONE 'UTC'"
    elif kind == "timestamptz" and found in _INTEGER_TYPES | _FLOAT_TYPES | {"numeric"}:
        template = "to_timestamp({c})"  # Unix seconds
    elif kind == "number" and found == "interval":
        template = "EXTRACT(EPOCH FROM {c})"
    elif column == "client_id" and found in _FLOAT_TYPES | {"numeric"}:
        # A fraction or a value beyond a bigint becomes NULL (its CDR skipped, saying so), not an error.
        template = (
            "CASE WHEN {c} = trunc({c}) AND {c} BETWEEN -9223372036854775808 AND 9223372036854775807 "
            "THEN {c}::bigint END"
        )
    elif kind == "integer" and found == "boolean":
        template = "CASE WHEN {c} THEN 1 ELSE 0 END"  # or the field's own codes (amd_status: 2 / 1)
    elif kind.endswith("array") and not found.endswith("[]") and found not in _JSON_TYPES:
        element = "bigint" if kind == "integer array" else "text"
        template = f"array_remove(ARRAY[{{c}}::{element}], NULL)"
    return template.format(c=column)
