"""Writes dialer data into the reference schema (sql/reference_schema.sql): clients to CDRs.

The demo uses it to make its CDRs, the tests to make theirs; every CDR goes through the same
tables and view a real dialer would fill.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_SCHEMA = ROOT / "sql" / "reference_schema.sql"


def load_reference_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the dialer tables and the cdr_webhook_source view (idempotent)."""
    conn.execute(REFERENCE_SCHEMA.read_text())


class Dialer:
    """Creates clients, campaigns, phonebooks, contacts and CDRs; each CDR one row in dialer.cdr."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self._gateway: int | None = None
        self._campaigns: dict[int, int] = {}
        self._contacts: dict[tuple[int, str], int] = {}

    def client(self, client_id: int, name: str | None = None) -> int:
        self.conn.execute(
            "INSERT INTO dialer.client (id, name) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING",
            (client_id, name or f"Client {client_id}"),
        )
        return client_id

    def gateway(self) -> int:
        if self._gateway is None:
            row = self.conn.execute(
                "INSERT INTO dialer.gateway (name) VALUES ('sofia/gateway/carrier-eu') "
                "ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id"
            ).fetchone()
            assert row is not None
            self._gateway = row[0]
        return self._gateway

    def campaign(self, client_id: int, name: str | None = None) -> int:
        if client_id not in self._campaigns:
            self.client(client_id)
            row = self.conn.execute(
                "INSERT INTO dialer.campaign (client_id, name, callerid, gateway_id) "
                "VALUES (%s, %s, %s, %s) RETURNING id",
                (client_id, name or f"Winter renewals {client_id}", "+442071838750", self.gateway()),
            ).fetchone()
            assert row is not None
            self._campaigns[client_id] = row[0]
        return self._campaigns[client_id]

    def contact(self, client_id: int, phone_number: str, phonebooks: tuple[str, ...]) -> int:
        key = (client_id, phone_number)
        if key not in self._contacts:
            self.client(client_id)
            row = self.conn.execute(
                "INSERT INTO dialer.contact (client_id, phone_number) VALUES (%s, %s) RETURNING id",
                (client_id, phone_number),
            ).fetchone()
            assert row is not None
            contact_id = row[0]
            for name in phonebooks:
                book = self.conn.execute(
                    "SELECT id FROM dialer.phonebook WHERE client_id = %s AND name = %s", (client_id, name)
                ).fetchone()
                if book is None:
                    book = self.conn.execute(
                        "INSERT INTO dialer.phonebook (client_id, name) VALUES (%s, %s) RETURNING id",
                        (client_id, name),
                    ).fetchone()
                assert book is not None
                self.conn.execute(
                    "INSERT INTO dialer.phonebook_contact (phonebook_id, contact_id) VALUES (%s, %s)",
                    (book[0], contact_id),
                )
            self._contacts[key] = contact_id
        return self._contacts[key]

    def cdr(
        self,
        *,
        client_id: int = 1,
        phone_number: str = "+34650123456",
        phonebooks: tuple[str, ...] = ("Leads Madrid", "Renewals Q4"),
        created_at: dt.datetime | None = None,
        call_date: dt.datetime | None = None,
        leg_type: int = 1,
        callerid: str | None = None,
        amd_status: int | None = 1,
        hangup_cause_code: int | None = 16,
        hangup_cause: str | None = None,
        cost: Decimal | None = Decimal("0.0525"),
        billed_duration: int | None = 42,
        incremental_duration: int | None = 60,
        cdr_id: str | None = None,
    ) -> str:
        """Insert one CDR (with its call request) and return its cdr_id."""
        campaign_id = self.campaign(client_id)
        contact_id = self.contact(client_id, phone_number, phonebooks)
        callrequest_id = uuid.uuid4()
        self.conn.execute(
            "INSERT INTO dialer.callrequest (id, campaign_id, contact_id) VALUES (%s, %s, %s)",
            (callrequest_id, campaign_id, contact_id),
        )
        cdr_uuid = uuid.UUID(cdr_id) if cdr_id else uuid.uuid4()
        now = dt.datetime.now(dt.UTC)
        self.conn.execute(
            "INSERT INTO dialer.cdr (id, callrequest_id, call_id, leg_type, phone_number, callerid, "
            "gateway_id, amd_status, hangup_cause_code, hangup_cause, cost, billed_duration, "
            "incremental_duration, call_date, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
            "COALESCE(%s, clock_timestamp()))",
            (
                cdr_uuid,
                callrequest_id,
                str(uuid.uuid4()),
                leg_type,
                phone_number,
                callerid,
                self.gateway(),
                amd_status,
                hangup_cause_code,
                hangup_cause,
                cost,
                billed_duration,
                incremental_duration,
                call_date or (created_at or now) - dt.timedelta(seconds=90),
                created_at,
            ),
        )
        return str(cdr_uuid)
