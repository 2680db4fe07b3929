"""``source preview``: the requests a run over a window would send, built by the run's own code, sent nowhere.

Every CDR of the window (as policy ``all`` would select it) is routed to its endpoint
(:mod:`cdr_webhook.routing`), read as the select step reads it, mapped
(:func:`~cdr_webhook.payload.build_payload`, the endpoint's filters), encoded and signed
(:func:`~cdr_webhook.signing.signed_headers` with the connection's real secrets); the secrets are then
masked for showing. Nothing is sent and nothing is written: not the ledger, not the watermark.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from cdr_webhook.endpoint_config import EndpointConfigError
from cdr_webhook.ledger import MAX_CDR_ID_LENGTH
from cdr_webhook.payload import InvalidCdr
from cdr_webhook.redact import scrub
from cdr_webhook.request import Excluded, request_body, shown_headers
from cdr_webhook.routing import Router
from cdr_webhook.selection import source
from cdr_webhook.settings import DEFAULT_ENDPOINT_CONN_ID
from cdr_webhook.signing import webhook_id

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Callable, Iterator, Mapping

    import psycopg

    from cdr_webhook.endpoint_config import EndpointConfig
    from cdr_webhook.settings import Settings

#: Source rows read at once (as the select step checks its claims).
_BATCH = 1000


@dataclasses.dataclass(frozen=True)
class PreviewedCdr:
    """One CDR of the window: the request it would get, or why it would get none."""

    cdr_id: str | None
    endpoint: str
    origin: str | None
    body: bytes | None
    headers: dict[str, str]  # masked
    not_sent: str | None = None  # why no request: skipped or held, in the ledger's words


def previews(
    conn: psycopg.Connection[Any],
    settings: Settings,
    *,
    start: dt.datetime,
    end: dt.datetime,
    client_id: int | None,
    connections: Callable[[str], EndpointConfig | None],
    limit: int,
) -> Iterator[PreviewedCdr]:
    """Yield the CDRs of ``[start, end)``, oldest first, at most ``limit``, each with its request."""
    relation = settings.source_relation
    source.check_source(conn, relation)
    router = Router(
        lambda conn_id: _exists(connections, conn_id),
        unrouted=settings.unrouted_clients,
        default_endpoint=DEFAULT_ENDPOINT_CONN_ID,
    )
    keys = source.window_keys(conn, relation, start=start, end=end, client_id=client_id, limit=limit)
    seen: set[str] = set()
    for index in range(0, len(keys), _BATCH):
        batch = keys[index : index + _BATCH]
        earliest = _earliest_rows(batch, seen)
        rows = source.fetch_rows(conn, relation, earliest)
        for cdr_id, created_at, client in batch:
            route = router.route(client)
            if cdr_id is not None and (cdr_id, created_at) not in earliest:
                why = "another row of this cdr_id, shown above, is the CDR"
                yield PreviewedCdr(cdr_id, route.endpoint, None, None, {}, why)
                continue
            if cdr_id is not None:
                earliest.remove((cdr_id, created_at))  # a second row of the same key is the same CDR
            if route.skip_reason is not None:
                yield PreviewedCdr(cdr_id, route.endpoint, None, None, {}, f"skipped: {route.skip_reason}")
                continue
            row = rows.get(cdr_id or "")
            yield _previewed(cdr_id, row, route.endpoint, connections, settings.max_payload_bytes)


def _earliest_rows(
    batch: list[tuple[str | None, dt.datetime, int | None]], seen: set[str]
) -> set[tuple[str, dt.datetime]]:
    """
    The first keys in ``batch`` of the cdr_ids not ``seen`` yet (adding them to it): a cdr_id is one CDR,
    its earliest row, as the queue takes it; reading a later row too would make it look ambiguous.
    """
    earliest = set()
    for cdr_id, created_at, _ in batch:
        if cdr_id is not None and cdr_id not in seen:
            seen.add(cdr_id)
            earliest.add((cdr_id, created_at))
    return earliest


def _exists(connections: Callable[[str], EndpointConfig | None], conn_id: str) -> bool:
    try:
        return connections(conn_id) is not None
    except EndpointConfigError:
        return True  # a malformed connection is held, not re-routed, as in a run


def _previewed(
    cdr_id: str | None,
    row: Mapping[str, Any] | None,
    endpoint: str,
    connections: Callable[[str], EndpointConfig | None],
    max_bytes: int,
) -> PreviewedCdr:
    try:
        config = connections(endpoint)
        if config is None:
            raise EndpointConfigError.missing(endpoint)
    except EndpointConfigError as err:
        return PreviewedCdr(cdr_id, endpoint, None, None, {}, f"held (stays queued): configuration: {err}")
    secrets = config.secrets()
    if cdr_id is None or row is None:
        return PreviewedCdr(cdr_id, endpoint, config.origin, None, {}, "skipped: column cdr_id is NULL")
    if len(cdr_id) > MAX_CDR_ID_LENGTH:
        why = f"skipped: cdr_id is {len(cdr_id)} characters long, at most {MAX_CDR_ID_LENGTH} fit"
        return PreviewedCdr(cdr_id, endpoint, config.origin, None, {}, why)
    try:
        body = request_body(cdr_id, row, relation="the source", max_bytes=max_bytes, filters=config.filters)
    except Excluded as err:
        return PreviewedCdr(cdr_id, endpoint, config.origin, None, {}, f"skipped: {err}")
    except InvalidCdr as err:
        return PreviewedCdr(cdr_id, endpoint, config.origin, None, {}, f"skipped: {scrub(str(err), secrets)}")
    shown = shown_headers(config, body, webhook_id(cdr_id, endpoint))
    return PreviewedCdr(cdr_id, endpoint, config.origin, body, shown)
