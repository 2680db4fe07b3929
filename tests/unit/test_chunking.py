"""How the select step groups a run's claims into chunk tasks (chunk mode)."""

from __future__ import annotations

import datetime as dt

from cdr_webhook.ledger import Claim
from cdr_webhook.selection.tasks import chunked

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)


def claims(order: str) -> list[Claim]:
    """Claims in round-robin order: ``"abab"`` is a's oldest, b's oldest, a's second, b's second."""
    seen: dict[str, int] = {}
    made = []
    for endpoint in order:
        seen[endpoint] = seen.get(endpoint, 0) + 1
        made.append(Claim(f"{endpoint}{seen[endpoint]}", endpoint, 7, T0, "queued", 0))
    return made


def ids(chunks: list[list[Claim]]) -> list[list[str]]:
    return [[claim.cdr_id for claim in chunk] for chunk in chunks]


def test_each_chunk_is_one_endpoints_cdrs_oldest_first_every_endpoint_early():
    chunks, surplus = chunked(claims("abcabcabab"), 2)
    assert ids(chunks) == [["a1", "a2"], ["b1", "b2"], ["c1", "c2"], ["a3", "a4"], ["b3", "b4"]]
    assert surplus == []


def test_chunks_beyond_the_limit_give_their_claims_back():
    chunks, surplus = chunked(claims("abcdabcd"), 2, max_chunks=3)
    assert ids(chunks) == [["a1", "a2"], ["b1", "b2"], ["c1", "c2"]]
    assert [claim.cdr_id for claim in surplus] == ["d1", "d2"]
