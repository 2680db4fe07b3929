"""``source check``: whether the source relation can be delivered as it stands, and what to change if not.

Five checks, each reported on its own: the columns and their types (the rules of
:mod:`cdr_webhook.source_types`, which the run-start check applies too), the relation's query over
its newest rows, the index a ``created_at`` range needs, the newest rows mapped through the real
payload mapping (what a run would skip, by reason), and those rows field by field (each field's
share of NULLs and its commonest values; a warning for a field NULL in every row that the view
computes: a conversion that matches nothing sends NULL without failing). The CLI adds a sixth, the
commit watcher's (:func:`cdr_webhook.watch.notify.source_finding`). Reads only.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import re
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from cdr_webhook.ledger import MAX_CDR_ID_LENGTH
from cdr_webhook.payload import PAYLOAD_FIELDS, Ambiguous, InvalidCdr, Unloadable, build_payload, shown
from cdr_webhook.selection import source
from cdr_webhook.source_types import check_types

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    import psycopg

_INDEX_NODES = ("Index Scan", "Index Only Scan", "Bitmap Index Scan")
_CONDITIONS = ("Index Cond", "Recheck Cond", "Filter", "Join Filter")


@dataclasses.dataclass(frozen=True)
class Finding:
    """The outcome of one check: ``ok`` False fails ``source check``; ``lines`` say what and how to fix."""

    check: str
    ok: bool
    lines: tuple[str, ...]
    warn: bool = False  # ok, but a line says what looks wrong


def check_columns(conn: psycopg.Connection[Any], relation: str) -> Finding:
    """The relation's columns against the payload's: each missing or mistyped one, with the cast to use."""
    types = source.column_types(conn, relation)
    missing = [column for column in source.SOURCE_COLUMNS if column not in types]
    problems = check_types(types)
    lines = [f"column {column} is missing" for column in missing]
    lines += [("error: " if problem.fatal else "warning: ") + problem.message for problem in problems]
    ok = not missing and not any(problem.fatal for problem in problems)
    if ok:
        lines.insert(0, f"{len(source.SOURCE_COLUMNS)} columns, each of a type the payload can carry")
    return Finding("columns", ok, tuple(lines))


def check_query(conn: psycopg.Connection[Any], relation: str, rows: int) -> Finding:
    """Read the newest rows through the relation: a cast that fails on one value fails here."""
    failure = source.probe_newest(conn, relation, rows)
    if failure is None:
        return Finding("query", True, (f"the newest {rows} rows read without a PostgreSQL error",))
    return Finding("query", False, (failure.message,))


def _nodes(plan: Any, table: str = "?") -> Iterator[tuple[dict[str, Any], str]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan, with the table it or its nearest ancestor reads."""
    if isinstance(plan, list):
        for item in plan:
            yield from _nodes(item, table)
    elif isinstance(plan, dict):
        if plan.get("Relation Name"):
            schema = f"{plan['Schema']}." if plan.get("Schema") else ""
            table = schema + plan["Relation Name"]
        if "Node Type" in plan:
            yield plan, table  # a Bitmap Index Scan names no table: its Bitmap Heap Scan above does
        for key in ("Plan", "Plans"):
            if key in plan:
                yield from _nodes(plan[key], table)


def _range_condition(node: dict[str, Any]) -> tuple[str, str] | None:
    """The condition of ``node`` that holds the created_at range (its bounds are timestamptz constants)."""
    for name in _CONDITIONS:
        text = node.get(name) or ""
        if "timestamp with time zone" in text and ">=" in text:
            return name, text
    return None


def check_index(conn: psycopg.Connection[Any], relation: str) -> Finding:
    """Whether a ``created_at`` range reaches an index, from the plan with sequential scans discouraged."""
    end = dt.datetime.now(dt.UTC)
    plan = source.range_plan(conn, relation, start=end - dt.timedelta(minutes=1), end=end)
    held = [(node, table, found) for node, table in _nodes(plan) if (found := _range_condition(node))]
    for node, table, (name, _) in held:
        if node["Node Type"] in _INDEX_NODES and name == "Index Cond":
            return Finding(
                "index", True, (f"a created_at range reads {table} by its index {node.get('Index Name')}",)
            )
    if not held:
        return Finding(
            "index",
            False,
            (
                "the plan of a created_at range filters no table by it (is created_at computed after a "
                "join or an aggregate?): expose a plain column of the CDR table, indexed",
            ),
        )
    node, table, (_, condition) = held[0]
    expression = _indexed_expression(condition, node.get("Alias"))
    indexed = expression if expression.isidentifier() else f"({expression})"
    lines = [
        f"a created_at range reads {table} ({node['Node Type']}, filtering on {expression}) even with "
        "sequential scans discouraged: no index serves it; create one: "
        f"CREATE INDEX CONCURRENTLY ON {table} ({indexed})",
    ]
    lines += [
        f"index {index} of {table} is invalid (an interrupted CREATE INDEX CONCURRENTLY): "
        f"REINDEX INDEX CONCURRENTLY {index}"
        for index in source.invalid_indexes(conn, table)
    ]
    return Finding("index", False, tuple(lines))


def _indexed_expression(condition: str, alias: str | None) -> str:
    """``cdr.created_at`` of ``((cdr.created_at >= '…'::timestamp with time zone) AND …)``, unqualified."""
    expression = condition.lstrip("(").split(" >= ", 1)[0]
    return expression.replace(f"{alias}.", "") if alias else expression


def check_sample(conn: psycopg.Connection[Any], relation: str, size: int) -> Finding:
    """Map the newest ``size`` rows as a run would; the ones it would skip, grouped by reason."""
    return _sample(conn, relation, size)[0]


def _sample(
    conn: psycopg.Connection[Any], relation: str, size: int
) -> tuple[Finding, dict[str, dict[str, Any]]]:
    keys = source.newest_keys(conn, relation, size)
    skipped: dict[str, list[str]] = {}
    fetchable = []
    for cdr_id, created_at in keys:
        if cdr_id is None:
            skipped.setdefault("cdr_id: is NULL (recorded under a key of its own)", []).append("(NULL)")
        elif len(cdr_id) > MAX_CDR_ID_LENGTH:
            skipped.setdefault(f"cdr_id: longer than {MAX_CDR_ID_LENGTH} characters", []).append(cdr_id)
        elif isinstance(created_at, Unloadable):
            skipped.setdefault(f"created_at: {created_at.raw} is never in a run's range", []).append(cdr_id)
        else:
            fetchable.append((cdr_id, created_at))
    rows = source.fetch_rows(conn, relation, fetchable)
    for cdr_id, _ in fetchable:
        try:
            build_payload(rows[cdr_id])
        except InvalidCdr as err:
            skipped.setdefault(_reason(err), []).append(cdr_id)
    if not keys:
        return Finding("sample", False, (f"{relation} has no rows yet: nothing to check",)), rows
    count = sum(len(examples) for examples in skipped.values())
    if not count:
        return Finding("sample", True, (f"the newest {len(keys)} CDRs map: none would be skipped",)), rows
    lines = [f"{count} of the newest {len(keys)} CDRs would be skipped:"]
    for reason, examples in sorted(skipped.items(), key=lambda item: -len(item[1])):
        lines.append(f"  {len(examples):>6}  {reason} (e.g. cdr_id {examples[0]!r})")
    return Finding("sample", False, tuple(lines)), rows


#: The commonest values the field check shows of each field.
SHOWN_VALUES = 3


def check_fields(rows: Mapping[str, Mapping[str, Any]], view: str | None) -> Finding:
    """
    Each field of the sampled ``rows``: its share of NULLs, how many distinct values, the commonest.

    Warns for a field that is NULL in every row unless ``view`` (the relation's SELECT, None for a
    table) writes it as a NULL constant (a field the dialer does not have): a conversion such as
    ``CASE c.leg WHEN 'A' …`` meeting ``'a'`` makes every CDR go out with the field NULL, and nothing fails.
    """
    if not rows:
        return Finding("fields", True, ("no sampled rows to describe",))
    width = max(len(field) for field in PAYLOAD_FIELDS)
    lines = [f"the newest {len(rows)} rows, field by field: NULL share, distinct values (commonest first)"]
    warnings = []
    for field in PAYLOAD_FIELDS:
        values = [row.get(field) for row in rows.values()]
        nulls = sum(1 for value in values if value is None)
        counts = collections.Counter(_value_text(value) for value in values if value is not None)
        named = field == "hangup_cause" and any(
            row.get("hangup_cause_code") is not None for row in rows.values()
        )
        note = " (sent named from hangup_cause_code)" if named and nulls else ""
        lines.append(f"  {field:<{width}} {nulls / len(values):>5.0%} NULL  {_distinct(counts)}{note}")
        if nulls == len(values) and not named and not _null_constant(view, field):
            warnings.append(
                f"warning: {field} is NULL in all {len(values)} sampled rows, yet the relation gives it "
                "a value from your data: check its conversion (does a CASE or cast match what the "
                "dialer writes, e.g. 'a' as well as 'A'?), or write NULL::<type> if the dialer has none"
            )
    return Finding("fields", True, tuple(lines + warnings), warn=bool(warnings))


def _distinct(counts: collections.Counter[str]) -> str:
    if not counts:
        return "no value"
    total = sum(counts.values())
    if len(counts) == total and total > SHOWN_VALUES:
        return f"{len(counts)} distinct (every row its own)"
    commonest = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:SHOWN_VALUES]
    shown_values = ", ".join(value + (f" ×{count}" if count > 1 else "") for value, count in commonest)
    more = ", …" if len(counts) > SHOWN_VALUES else ""
    return f"{len(counts)} distinct: {shown_values}{more}"


def _value_text(value: Any) -> str:
    """A source value as the check shows it: numbers and times plainly, text quoted and bounded."""
    if isinstance(value, (Ambiguous, Unloadable)):
        return "(unreadable)"
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, dt.datetime, dt.date)):
        return shown(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return str(value)


def _null_constant(view: str | None, field: str) -> bool:
    """Whether the view's SELECT writes ``field`` as a NULL constant (``NULL::integer AS amd_status``)."""
    if view is None:
        return False
    return re.search(_NULL_ITEM.format(field=re.escape(field)), view, re.IGNORECASE) is not None


#: A select-list item that is only a NULL, cast or not (``NULL::numeric(12,5) AS cost``), as
#: ``pg_get_viewdef`` writes it; a NULL inside an expression (``ELSE NULL::integer END``) is not one.
_NULL_ITEM = (
    r"(?:^|,|\bSELECT)\s*NULL(?:::[\w\".]+(?:\([\d, ]+\))?"
    r"(?:\s+(?:varying|precision|with time zone|without time zone))?(?:\[\])?)?"
    r"\s+AS\s+\"?{field}\"?\s*(?:,|$|\bFROM\b)"
)


def _reason(err: InvalidCdr) -> str:
    if "appears in" in err.problem:  # duplicate rows of one CDR: the problem names the CDR
        return "cdr_id: rows of one cdr_id and created_at differ: make the view return one row per CDR"
    return f"{err.column}: {err.problem}"


def run_checks(conn: psycopg.Connection[Any], relation: str, *, sample: int) -> list[Finding]:
    """Every check of ``source check``; the sample only when the relation's query reads."""
    findings = [check_columns(conn, relation)]
    if any(line.startswith("column ") and line.endswith("missing") for line in findings[0].lines):
        return findings  # the other checks read those columns
    query = check_query(conn, relation, sample)
    findings += [query, check_index(conn, relation)]
    if query.ok:
        finding, rows = _sample(conn, relation, sample)
        findings.append(finding)
        findings.append(check_fields(rows, source.view_definition(conn, relation)))
    return findings
