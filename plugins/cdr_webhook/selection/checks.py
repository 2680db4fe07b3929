"""The claims' rows checked before any task is mapped: a row that cannot become a payload, that its
endpoint filters out, or whose body is too big is skipped once, with its reason."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cdr_webhook import ledger
from cdr_webhook.payload import InvalidCdr
from cdr_webhook.request import Excluded, request_body
from cdr_webhook.selection.source import fetch_rows

if TYPE_CHECKING:
    import psycopg

    from cdr_webhook.selection.endpoint_view import RunEndpoints
    from cdr_webhook.settings import Settings

log = logging.getLogger(__name__)

#: Source rows the select step reads at once to check its claims.
_CHECK_BATCH = 1000


def drop_invalid(
    conn: psycopg.Connection[Any], settings: Settings, claims: list[ledger.Claim], known: RunEndpoints
) -> list[ledger.Claim]:
    """
    Mark claims that cannot become a payload, that their endpoint filters out, or whose body is over
    ``max_payload_bytes``, as skipped: each once, with its reason, before any task is mapped to it.

    Rows are read :data:`_CHECK_BATCH` at a time: a run of chunk mode may claim tens of thousands.
    """
    relation = settings.source_relation
    sendable = []
    rows: dict[str, Any] = {}
    for index, claim in enumerate(claims):
        if index % _CHECK_BATCH == 0:
            batch = claims[index : index + _CHECK_BATCH]
            rows = fetch_rows(conn, relation, ((c.cdr_id, c.cdr_created_at) for c in batch))
        row = rows.get(claim.cdr_id)
        if row is None:
            reason = f"CDR {claim.cdr_id!r} is no longer in the source relation {relation!r}"
        else:
            try:
                filters = known.config(claim.endpoint).filters
                request_body(
                    claim.cdr_id,
                    row,
                    relation=relation,
                    max_bytes=settings.max_payload_bytes,
                    filters=filters,
                )
            except (InvalidCdr, Excluded) as err:
                reason = str(err)
            else:
                sendable.append(claim)
                continue
        log.warning("Skipping: %s", reason)
        ledger.mark_skipped(conn, claim, reason)
    return sendable
