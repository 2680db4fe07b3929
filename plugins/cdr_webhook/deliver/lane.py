"""One endpoint's CDRs in a task of many: a *lane* of :mod:`cdr_webhook.deliver.lanes`."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from cdr_webhook.outcome import Verdict
from cdr_webhook.signing import webhook_id

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cdr_webhook.deliver.hook import CdrWebhookHook, SessionPool
    from cdr_webhook.deliver.rate import Pacer
    from cdr_webhook.deliver.slots import HeldSlots
    from cdr_webhook.endpoint_config import EndpointConfig
    from cdr_webhook.ledger import Claim
    from cdr_webhook.outcome import Attempt

#: A lane stops for this try after this many of its in-flight limit of POSTs in a row were to retry,
#: none delivered: its endpoint is down, and its other CDRs wait for the task's retry, unsent.
STOP_AFTER_LIMITS = 2


class Lane:
    """
    One endpoint's CDRs in a task: what waits, what is in flight, the slots held, how it fares.

    It takes the endpoint's slots that come free (another task finished) up to its fair share (the
    limit divided among the endpoint's tasks sending at once); once fewer CDRs are left than slots
    held, or more tasks share the endpoint, it gives the spare ones back.
    """

    def __init__(self, endpoint: EndpointConfig, hook: CdrWebhookHook, claims: Sequence[Claim], limit: int):
        self.endpoint = endpoint
        self.hook = hook
        self.limit = limit
        self.wanted = max(min(limit, len(claims)), 1)  # the most slots it may use
        self.waiting: collections.deque[Claim] = collections.deque(claims)
        self.running = 0
        self.held: HeldSlots | None = None
        self.share = 0
        self.retry_in_a_row = 0  # POSTs to retry since this try's last delivery
        self.delivered = 0
        self.stopped: str | None = None  # why it sends no more in this try
        self.sessions: SessionPool | None = None  # None: a malformed TLS extra, each POST refuses
        self.pacer: Pacer | None = None  # its send times under a rate limit (None: no limit)
        self.msg_ids = {claim.cdr_id: webhook_id(claim.cdr_id, endpoint.conn_id) for claim in claims}

    @property
    def conn_id(self) -> str:
        return self.endpoint.conn_id

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def free_slots(self) -> int:
        return (len(self.held.slots) if self.held is not None else 0) - self.running

    def sharing(self) -> bool:
        """Whether its fair share matters now: it could take more slots, or holds more than one."""
        if self.held is None or not self.waiting or self.stopped:
            return False
        held = len(self.held.slots)
        return held > 1 or held < min(self.wanted, self.running + len(self.waiting))

    def grow(self, fair_share: int, spare: int | None = None) -> int:
        """
        Learn the lane's fair share and take the free slots up to it while CDRs wait, at most
        ``spare`` more (the task's threads no lane holds a slot for); return how many it took.
        """
        assert self.held is not None
        self.share = min(self.wanted, fair_share)
        held = len(self.held.slots)
        target = self.share if spare is None else min(self.share, held + max(spare, 0))
        if self.waiting and held < target:
            self.held.take_more(target)
        return len(self.held.slots) - held

    def shrink(self) -> None:
        """
        Give back the slots no POST will use: beyond what is left to send, or beyond this lane's
        share now that more tasks of the endpoint send (never one a POST is using, never the last).
        """
        if self.held is None:
            return
        keep = max(min(self.share, self.running + len(self.waiting)), 1)
        while len(self.held.slots) > max(keep, self.running):
            self.held.give_back(self.held.slots[-1])

    def counted(self, attempt: Attempt) -> None:
        """Count an outcome; after :data:`STOP_AFTER_LIMITS` limits of retries in a row, stop."""
        verdict = attempt.decision.verdict
        if verdict is Verdict.DELIVERED:
            self.delivered += 1
            self.retry_in_a_row = 0
        elif verdict is Verdict.RETRY:
            self.retry_in_a_row += 1
            if self.retry_in_a_row >= STOP_AFTER_LIMITS * self.limit and self.waiting:
                self.stopped = f"its last {self.retry_in_a_row} POSTs are to retry ({attempt.decision.error})"
