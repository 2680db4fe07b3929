"""An endpoint's decided attempts as the delivery engine makes them, for tests that count outcomes by hand.

The attempts themselves are built as the benchmarks build theirs: :func:`bench.records.attempt`.
"""

from __future__ import annotations

from cdr_webhook.outcome import Decision, Verdict


def outcome(*, delivered: bool, final: bool = True, gone: bool = False) -> Decision:
    """A decided attempt as its endpoint counts it, for ``pause_rules.record_outcomes``."""
    if delivered:
        return Decision(Verdict.DELIVERED)
    return Decision(Verdict.FAIL_NOW if final else Verdict.RETRY, gone=gone)
