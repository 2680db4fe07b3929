"""A task of many CDRs (a chunk), of one or many endpoints: the delivery strategy that sends them on lanes.

A retry sends only its CDRs still queued; they go out at once up to each endpoint's limit
(:mod:`cdr_webhook.deliver.lanes`), and the task ends by its worst outcome
(:func:`~cdr_webhook.deliver.lanes.end_lanes`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk.exceptions import AirflowSkipException

from cdr_webhook.deliver.engine import DeliveryEngine
from cdr_webhook.deliver.lane import Lane
from cdr_webhook.deliver.lanes import end_lanes, send_lanes
from cdr_webhook.outcome import DeliveryStatus

if TYPE_CHECKING:
    from cdr_webhook.endpoint_config import EndpointConfig
    from cdr_webhook.ledger import Claim, NotStarted


class ChunkDelivery(DeliveryEngine):
    """
    A chunk: CDRs not this try's to send, a paused endpoint's and an unusable endpoint's are logged
    and left queued while the others go out; its first try (and its first after a clear) sends every
    CDR not delivered yet, a retry only those still queued.
    """

    def send(
        self, ready: list[tuple[EndpointConfig, list[Claim]]], bodies: dict[str, bytes], cdr_ids: list[str]
    ) -> None:
        lanes = [
            Lane(endpoint, self.hooks(endpoint.conn_id), sendable, self.in_flight_limit(endpoint))
            for endpoint, claims in ready
            if (sendable := [claim for claim in claims if claim.cdr_id in bodies])
        ]
        attempts, stopped = send_lanes(self, lanes, bodies) if lanes else ([], [])
        if not attempts and not stopped and self.paused and not (self.skipped or self.held):
            raise AirflowSkipException(
                f"endpoint {', '.join(self.paused)} is paused: the {self.paused_cdrs} CDR(s) of this chunk "
                "still to send stay queued and go out, in order, once the endpoint is resumed"
            )
        end_lanes(self, cdr_ids, attempts, stopped)

    def not_sent(self, found: NotStarted) -> None:
        self.log.info("Not sent from this try: %s", found.reason)

    def paused_back(self, endpoint_id: str, held_back: list[Claim]) -> None:
        self.log.warning(
            "Endpoint %s is paused: the %d CDR(s) of this chunk to it stay queued and go out, in order, "
            "once it is resumed",
            endpoint_id,
            len(held_back),
        )
        self.paused.append(endpoint_id)
        self.paused_cdrs += len(held_back)

    def unusable(self, endpoint_id: str, message: str) -> None:
        self.log.error("%s", message)

    def own_statuses(self) -> tuple[DeliveryStatus, ...]:
        # Airflow sets max_tries to try_number + retries when it clears a task: this is a fresh start.
        if self.ti.try_number == self.ti.max_tries - self.retries + 1:
            return DeliveryStatus.QUEUED, DeliveryStatus.FAILED, DeliveryStatus.SKIPPED
        return (DeliveryStatus.QUEUED,)
