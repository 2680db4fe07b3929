"""Loads the reference schema and a batch of demo CDRs into a CDR database (compose's ``cdr-seed``).

    python -m demo.seed [--if-empty]

Connects with ``CDR_DATABASE_URL`` when set, else with libpq's environment (``PGHOST``, ``PGUSER``,
``PGPASSWORD``, ``PGDATABASE``). Each run adds one batch; ``--if-empty`` adds it only to a database
with no CDR yet, so restarting the compose stack does not add the same batch again.
"""

from __future__ import annotations

import argparse
import os
import sys
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg

from demo.dialer import Dialer, load_reference_schema

if TYPE_CHECKING:
    from collections.abc import Sequence


def seed(conn: psycopg.Connection[Any], *, if_empty: bool = False) -> list[str]:
    """Load the reference schema, then insert the demo CDRs; return their ids (none when skipped)."""
    load_reference_schema(conn)
    if if_empty and conn.execute("SELECT EXISTS (SELECT 1 FROM dialer.cdr)").fetchone()[0]:
        return []
    dialer = Dialer(conn)
    dialer.campaign(2, "Campaña de renovación – 電話")
    return [
        dialer.cdr(),
        dialer.cdr(callerid="{{ 7 * 7 }}"),
        dialer.cdr(client_id=2, phone_number="+33612345678", phonebooks=("Clients Lyon",)),
        dialer.cdr(hangup_cause=None, hangup_cause_code=17, billed_duration=0, cost=Decimal("0")),
        dialer.cdr(leg_type=2, amd_status=2),
        # Cannot be mapped (cost is not a number): recorded as skipped with its reason.
        dialer.cdr(cost=Decimal("NaN")),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.seed", description=__doc__.splitlines()[0])
    parser.add_argument("--if-empty", action="store_true", help="add the CDRs only when there is none yet")
    args = parser.parse_args(argv)
    with psycopg.connect(os.environ.get("CDR_DATABASE_URL", ""), autocommit=True) as conn:
        cdr_ids = seed(conn, if_empty=args.if_empty)
    if cdr_ids:
        print(f"Loaded the reference schema and {len(cdr_ids)} demo CDRs: {', '.join(cdr_ids)}")
    else:
        print("Loaded the reference schema; the database has CDRs already, so none were added")
    return 0


if __name__ == "__main__":
    sys.exit(main())
