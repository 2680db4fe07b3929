"""POSTs without Airflow: the CDRs' signed bodies built as a task builds them, and plain keep-alive loops.

The loops are the reference a task's sending is measured against: the same bodies and headers,
built in advance, sent by one ``requests.Session`` (or one ``http.client`` connection) in order.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

from cdr_webhook.request import request_body
from cdr_webhook.selection.source import fetch_rows
from cdr_webhook.settings import Settings
from cdr_webhook.signing import build_headers, webhook_id

if TYPE_CHECKING:
    from collections.abc import Sequence

    import psycopg

SOURCE = "cdr_webhook_source"
Request = tuple[bytes, dict[str, str]]


def signed_requests(
    conn: psycopg.Connection[Any],
    ids: Sequence[str],
    *,
    endpoint: str,
    secret: str,
    api_key: str | None = None,
) -> list[Request]:
    """Each CDR's body and signed headers, in the order of ``ids``, as a ``post_cdr`` task builds them."""
    created = dict(
        conn.execute(
            f"SELECT cdr_id::text, created_at FROM {SOURCE} WHERE cdr_id::text = ANY(%s)", (list(ids),)
        )
    )
    rows = fetch_rows(conn, SOURCE, [(cdr_id, created[cdr_id]) for cdr_id in ids])
    max_bytes = Settings().max_payload_bytes
    out = []
    for cdr_id in ids:
        body = request_body(cdr_id, rows.get(cdr_id), relation=SOURCE, max_bytes=max_bytes)
        headers = build_headers(
            msg_id=webhook_id(cdr_id, endpoint),
            timestamp=int(time.time()),
            body=body,
            api_key=api_key,
            signing_secrets=(secret,),
        )
        out.append((body, headers))
    return out


def requests_loop(url: str, requests_: Sequence[Request]) -> list[int]:
    """POST each (body, headers) in turn on one keep-alive ``requests.Session``; return the statuses."""
    import requests  # in the raw loop's own process: its import is not the caller's

    statuses = []
    with requests.Session() as session:
        session.trust_env = False
        for body, headers in requests_:
            statuses.append(session.post(url, data=body, headers=headers, timeout=30).status_code)
    return statuses


def http_client_loop(url: str, requests_: Sequence[Request]) -> list[int]:
    """The same on one ``http.client.HTTPConnection``: the least a Python client can do per POST."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    statuses = []
    try:
        for body, headers in requests_:
            conn.request("POST", parsed.path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        conn.close()
    return statuses


def raw_loop(url: str, requests_: list[Request], loops: int) -> tuple[float, list[int]]:
    """POST every (body, headers) with ``loops`` keep-alive sessions at once; return (seconds, statuses)."""
    shares = [requests_[index::loops] for index in range(loops)]
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(loops) as pool:
        statuses = [status for share in pool.map(lambda s: requests_loop(url, s), shares) for status in share]
    return time.monotonic() - began, statuses
