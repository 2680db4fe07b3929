"""A plain source table, ``public.cdr_feed``, for tests that need rows the reference view cannot hold.

It has no key of its own, as a view over a dialer's tables may behave, and accepts any value.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datetime as dt

FEED = "public.cdr_feed"


def create_feed(conn: Any) -> None:
    """Create the table (dropping an old one)."""
    conn.execute(f"DROP TABLE IF EXISTS {FEED}")
    conn.execute(
        f"""
        CREATE TABLE {FEED} (
            client_id bigint, cdr_id text, callerid text, callrequest_id text, call_id text,
            campaign_id bigint, campaign_name text, leg_type int, phone_number text,
            list_phonebook_id bigint[], list_phonebook_name text[], gateway text, amd_status int,
            hangup_cause_code int, hangup_cause text, cost numeric, billed_duration int,
            incremental_duration int, call_date timestamptz, created_at timestamptz
        )
        """
    )


def add_feed_row(conn: Any, cdr_id: str | None, created_at: dt.datetime, **overrides: Any) -> str | None:
    """Insert one valid row for client 7, with ``overrides``; return its cdr_id."""
    row = {
        "client_id": 7,
        "cdr_id": cdr_id,
        "callerid": "x",
        "callrequest_id": "r",
        "call_id": "c",
        "campaign_id": 1,
        "campaign_name": "n",
        "leg_type": 1,
        "phone_number": "+3465",
        "list_phonebook_id": [1],
        "list_phonebook_name": ["a"],
        "gateway": "g",
        "amd_status": 1,
        "hangup_cause_code": 16,
        "hangup_cause": None,
        "cost": Decimal("0.1"),
        "billed_duration": 1,
        "incremental_duration": 1,
        "call_date": created_at,
        "created_at": created_at,
    }
    row.update(overrides)
    conn.execute(
        f"INSERT INTO {FEED} ({', '.join(row)}) VALUES ({', '.join(['%s'] * len(row))})",
        list(row.values()),
    )
    return cdr_id
