"""The page's forms and query strings, parsed: bad input is a :class:`ValueError` naming the field."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from cdr_webhook.selection.source import cdr_ids_by_phone
from cdr_webhook.web import deliveries
from cdr_webhook.window import POLICIES

if TYPE_CHECKING:
    import psycopg

#: CDRs a phone number search takes from the source (newest first).
PHONE_MATCHES = 1000


#: The days the page accepts: a CDR before 1970 or after 2999 is no CDR, and a day past Python's last
#: (9999-12-31) would overflow the day after it.
FIRST_DAY = dt.date(1970, 1, 1)
LAST_DAY = dt.date(2999, 12, 31)
#: A ``client_id`` is a PostgreSQL bigint: a bigger number would be compared as numeric, which no
#: index serves (the list would read the whole ledger).
BIGINT = (-(2**63), 2**63 - 1)
#: The longest search term and endpoint name the list takes (an endpoint is a connection id).
MAX_TERM_CHARS = 200
MAX_ENDPOINT_CHARS = 250


def parse_day(value: str | None, name: str) -> dt.date | None:
    if not value:
        return None
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name}: {value[:40]!r} is not a date (YYYY-MM-DD)") from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise ValueError(f"{name}: {value!r} is not between {FIRST_DAY} and {LAST_DAY}")
    return day


def parse_int(value: str | None, name: str) -> int | None:
    if value is None or value.strip() == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name}: {value[:40]!r} is not a whole number") from None
    if not BIGINT[0] <= number <= BIGINT[1]:
        raise ValueError(f"{name}: {value[:40]!r} is out of range (a client id is a 64-bit integer)")
    return number


def _bounded(value: str, name: str, limit: int) -> str:
    if len(value) > limit:
        raise ValueError(f"{name}: {len(value)} characters, at most {limit}")
    return value


def midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), dt.UTC)


@dataclasses.dataclass
class ListQuery:
    """The list's filters as the form sends them (dates are UTC days, ``to`` inclusive)."""

    client: str = ""
    endpoint: str = ""
    status: str = ""
    since: str = ""
    to: str = ""
    q: str = ""

    def window(self) -> tuple[dt.datetime | None, dt.datetime | None]:
        start, end = parse_day(self.since, "from"), parse_day(self.to, "to")
        return (
            midnight(start) if start else None,
            midnight(end + dt.timedelta(days=1)) if end else None,
        )

    def filters(self, conn: psycopg.Connection[Any], relation: str) -> deliveries.Filters:
        start, end = self.window()
        _bounded(self.q, "search", MAX_TERM_CHARS)
        _bounded(self.endpoint, "endpoint", MAX_ENDPOINT_CHARS)
        cdr_ids = None
        if self.q.strip():
            # One box for both: the cdr_id itself (the ledger's key) and the source's CDRs to that
            # number (the index behind the view's phone_number), each an index lookup.
            term = self.q.strip()
            by_phone = cdr_ids_by_phone(conn, relation, term, start=start, end=end, limit=PHONE_MATCHES)
            cdr_ids = (term, *by_phone)
        return deliveries.Filters(
            client_id=parse_int(self.client, "client"),
            endpoint=self.endpoint.strip() or None,
            status=self.status or None,
            start=start,
            end=end,
            cdr_ids=cdr_ids,
        )

    def params(self, **changes: str) -> str:
        values = {k: v for k, v in (dataclasses.asdict(self) | changes).items() if v}
        return urlencode(values)


def run_conf(*, policy: str, since: str, to: str, client: str) -> dict[str, Any]:
    """The Params of a ``cdr_webhook`` run over the UTC days ``since``..``to`` (inclusive)."""
    start, end = ListQuery(since=since, to=to).window()
    if start is None or end is None:
        raise ValueError("a run needs both days: from and to")
    if policy not in POLICIES:
        raise ValueError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
    conf: dict[str, Any] = {
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        "policy": policy,
    }
    client_id = parse_int(client, "client")
    if client_id is not None:
        conf["client_id"] = client_id
    return conf


def delivery_keys(values: list[str]) -> list[tuple[str, str]]:
    """The ``(cdr_id, endpoint)`` keys of the list's checkboxes (each a JSON pair)."""
    keys = []
    for value in values:
        try:
            cdr_id, endpoint = json.loads(value)
        except (ValueError, TypeError):
            raise ValueError(f"not a delivery key: {value[:80]!r}") from None
        keys.append((str(cdr_id), str(endpoint)))
    return keys
