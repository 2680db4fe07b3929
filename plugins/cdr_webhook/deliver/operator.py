"""The mapped POST task: the CDRs of one endpoint (one, or a chunk), every attempt recorded in the ledger."""

from __future__ import annotations

import datetime as dt
import functools
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.definitions.retry_policy import RetryDecision, RetryPolicy

from cdr_webhook.adapters import load_settings
from cdr_webhook.deliver.errors import RetryLater
from cdr_webhook.settings import AUTO_SIZED, CDR_DB_CONN_ID, DEFAULT_ENDPOINT_CONN_ID

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow.sdk import Context

    from cdr_webhook.deliver.hook import CdrWebhookHook

#: The mapped task's name in the grid (ids only, never CDR text): its CDR, or a chunk's first and size.
CDR_NAME_TEMPLATE = "{{ task.cdr_ids[0] }}"
CHUNK_NAME_TEMPLATE = "{{ task.cdr_ids[0] }} ({{ task.cdr_ids | length }} CDRs)"
#: With tasks sized by the run (``cdrs_per_task`` auto): a task of one CDR by its id, a chunk as above,
#: a task of several endpoints by its first CDR, its CDRs and its endpoints.
SIZED_NAME_TEMPLATE = (
    "{{ task.cdr_ids[0] }}{% if task.cdr_ids | length > 1 %} ({{ task.cdr_ids | length }} CDRs"
    "{% if task.endpoints | length > 1 %}, {{ task.endpoints | length }} endpoints{% endif %}){% endif %}"
)


class RetryAfterPolicy(RetryPolicy):
    """Wait as long as the receiver's ``Retry-After`` asks (capped), else Airflow's own backoff."""

    def __init__(self, max_delay_seconds: float) -> None:
        self.max_delay_seconds = max_delay_seconds

    def evaluate(
        self, exception: BaseException, try_number: int, max_tries: int, context: Context | None = None
    ) -> RetryDecision:
        if isinstance(exception, RetryLater) and exception.retry_after is not None:
            delay = min(exception.retry_after, self.max_delay_seconds)
            return RetryDecision.retry(
                delay=dt.timedelta(seconds=delay),
                reason=f"the receiver sent Retry-After: waiting {delay:g} s",
            )
        return RetryDecision.default()

    def serialize(self) -> dict[str, Any]:
        return {"__type": "RetryAfterPolicy", "max_delay_seconds": self.max_delay_seconds}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> RetryAfterPolicy:
        return cls(max_delay_seconds=data["max_delay_seconds"])


class CdrWebhookOperator(BaseOperator):
    """
    POST CDRs, each as its own Standard Webhooks–signed JSON request to its endpoint.

    The bodies are read from the source relation and built when the task runs: they are never a
    template field (CDR text such as ``{{ 7 * 7 }}`` must arrive verbatim) and never travel through
    XCom, so phone numbers stay out of Airflow's metadata database. Outcome of each CDR: 2xx
    delivered; 408, 429, 5xx, timeouts and connection errors retried by Airflow with backoff (or
    after the receiver's ``Retry-After``); any other status, and an endpoint the egress guard
    refuses, failed at once, without using the task's retries. A 410, or sustained failure, pauses
    the endpoint.

    A task of one CDR (``cdrs_per_task`` 1, or a one-CDR task of ``auto``, the default) ends as its CDR
    does. A chunk (up to ``cdrs_per_task`` of one endpoint, or a task of more than one CDR of one or
    many endpoints with ``auto``) sends up to each endpoint's in-flight limit at once and ends by the
    worst outcome among its CDRs: some to retry, it raises for Airflow to retry, and the retry sends
    only those; some failed for good (after its other CDRs were delivered), it fails, naming them;
    clearing it sends again its CDRs not delivered.

    :param cdr_ids: The CDRs to send, oldest first (grouped by endpoint when ``endpoints`` is given).
    :param http_conn_id: The HTTP connection of the endpoint: ``host`` is the full URL, ``password``
        the ``x-api-key`` value, extra ``signing_secret`` the ``whsec_…`` secret.
    :param endpoints: A task of several endpoints: ``[(http_conn_id, n), ...]``, the first ``n`` of
        ``cdr_ids`` to the first endpoint, the next to the second, and so on; None, all to
        ``http_conn_id``.
    :param db_conn_id: The Postgres connection of the CDR database.
    :param cdrs_per_task: The DAG's chunk size: above 1, the task is a chunk, whatever its length;
        ``auto`` (0), the select step sized it: a chunk when it has more than one CDR, with an
        ``execution_timeout`` that grows with its length.

    A ``BaseOperator``, not the HTTP provider's ``HttpOperator``: its ``execute`` and hook would both be
    replaced, and importing that module (``aiohttp``, for its deferrable mode) would add to every task's
    start-up (docs/tuning.md).
    """

    # Nothing is templated: every value here comes from CDR data, which must never be rendered.
    template_fields: Sequence[str] = ()
    template_fields_renderers: dict[str, str] = {}
    ui_color = "#9fd3c7"

    def __init__(
        self,
        *,
        cdr_ids: Sequence[str],
        http_conn_id: str = DEFAULT_ENDPOINT_CONN_ID,
        db_conn_id: str = CDR_DB_CONN_ID,
        cdrs_per_task: int = 1,
        endpoints: Sequence[Sequence[Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["do_xcom_push"] = False
        sized = cdrs_per_task == AUTO_SIZED
        if sized and cdr_ids:
            settings = load_settings()
            kwargs["execution_timeout"] = (
                settings.chunk_timeout_for(len(cdr_ids)) if len(cdr_ids) > 1 else settings.attempt_timeout
            )
        super().__init__(**kwargs)
        if not cdr_ids or (not sized and len(cdr_ids) > cdrs_per_task):
            raise ValueError(
                f"a post_cdr task sends 1 to {cdrs_per_task if not sized else 'any number of'} CDR(s), "
                f"not {len(cdr_ids)}"
            )
        self.cdr_ids = list(cdr_ids)
        self.endpoints = [(str(conn_id), int(n)) for conn_id, n in endpoints or ()]
        if self.endpoints and sum(n for _, n in self.endpoints) != len(self.cdr_ids):
            raise ValueError(
                f"endpoints {self.endpoints!r} count {sum(n for _, n in self.endpoints)} CDR(s), "
                f"cdr_ids {len(self.cdr_ids)}"
            )
        self.http_conn_id = http_conn_id
        self.db_conn_id = db_conn_id
        self.cdrs_per_task = cdrs_per_task
        self.chunk = len(self.cdr_ids) > 1 if sized else cdrs_per_task > 1

    @functools.cached_property
    def hook(self) -> CdrWebhookHook:
        """The hook of ``http_conn_id``, with the ``request_timeout_seconds`` and egress settings."""
        from cdr_webhook.deliver.hook import CdrWebhookHook

        return CdrWebhookHook.from_settings(self.http_conn_id, db_conn_id=self.db_conn_id)

    def hook_for(self, conn_id: str) -> CdrWebhookHook:
        """The hook of an endpoint of this task, made once per task (:attr:`hook` for ``http_conn_id``)."""
        from cdr_webhook.deliver.hook import CdrWebhookHook

        if conn_id == self.http_conn_id:
            return self.hook
        hooks: dict[str, CdrWebhookHook] = self.__dict__.setdefault("_other_hooks", {})
        if conn_id not in hooks:
            hooks[conn_id] = CdrWebhookHook.from_settings(conn_id, db_conn_id=self.db_conn_id)
        return hooks[conn_id]

    def deliveries(self) -> list[tuple[str, list[str]]]:
        """``(endpoint, its cdr_ids)`` of this task, in order."""
        if not self.endpoints:
            return [(self.http_conn_id, self.cdr_ids)]
        out, start = [], 0
        for conn_id, n in self.endpoints:
            out.append((conn_id, self.cdr_ids[start : start + n]))
            start += n
        return out

    def execute(self, context: Context) -> None:
        import functools

        from cdr_webhook.db import connect
        from cdr_webhook.deliver.chunks import ChunkDelivery
        from cdr_webhook.deliver.engine import OneCdrDelivery

        with connect(self.db_conn_id) as conn:
            strategy = ChunkDelivery if self.chunk else OneCdrDelivery
            engine = strategy(
                conn,
                self.hook_for,
                ti=context["ti"],
                settings=load_settings(),
                log=self.log,
                retries=self.retries,
                time_limit=self.execution_timeout,
                connect=functools.partial(connect, self.db_conn_id),
            )
            engine.run(self.deliveries())
