"""How a run's CDRs become ``post_cdr`` tasks: one task per CDR, or a few tasks that share the run.

The default (``cdrs_per_task`` ``auto``) sizes the tasks from the run's whole work: a run of up to
``chunk_above`` CDRs maps a task per CDR (light traffic: each CDR its own line in the grid, its own
tries and log, and that few tasks start within seconds); a bigger run maps one task per task slot
at most, each carrying the CDRs of any number of endpoints. A task start costs far more than a POST
(Airflow starts about 4 tasks a second on 2 cores), so spread traffic, a burst and a backlog all
go faster in a few tasks that keep every slot busy than in a task per CDR.

Inside a task each endpoint keeps its own rules (its in-flight limit, deadline, pause and retries:
:mod:`cdr_webhook.deliver.lanes`). An endpoint's CDRs stay in one task unless it holds more than a
task's share of the run; then they are dealt to several tasks, at most its in-flight limit, in
turn, so the tasks sending side by side send its oldest first.

Pure: it groups what it is given and reads nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


class HasEndpoint(Protocol):
    @property
    def endpoint(self) -> str: ...


C = TypeVar("C", bound=HasEndpoint)


@dataclasses.dataclass(frozen=True)
class Sizing:
    """
    What the automatic sizing needs to know.

    :param chunk_above: A run of up to this many CDRs maps a task per CDR; a bigger one shares tasks.
    :param task_slots: The run's ``post_cdr`` tasks that can run at once: the smallest of
        ``max_active_posts_per_run``, the executor's ``[core] parallelism`` and the worker's cores.
    :param in_flight: ``endpoint -> its in-flight limit`` (POSTs at once, across every task).
    """

    chunk_above: int
    task_slots: int
    in_flight: Callable[[str], int]

    def task_count(self, cdrs: int) -> int:
        """How many tasks a run of ``cdrs`` CDRs maps (a task each up to ``chunk_above``)."""
        if cdrs <= self.chunk_above:
            return cdrs
        return max(min(math.ceil(cdrs / self.chunk_above), self.task_slots), 1)


def plan(claims: Sequence[C], sizing: Sizing, max_tasks: int | None = None) -> tuple[list[list[C]], list[C]]:
    """
    Group a run's claims (in the ledger's round-robin order) into tasks; the surplus apart.

    Up to ``chunk_above`` claims: a task each. More: :meth:`Sizing.task_count` tasks. Each
    endpoint's claims form one piece, or, when the endpoint holds more than a task's share of the
    run, as many pieces as its share of the tasks, rounded (at most its in-flight limit), its claims dealt to
    them in turn. The pieces go, largest first, to the least loaded task that has none of the same
    endpoint. Each task keeps the claims' order, and the tasks are ordered by their first claim, so
    every endpoint's oldest CDR goes out early. Beyond ``max_tasks`` tasks, the later ones are
    returned apart, as the claims to give back to the queue.
    """
    if len(claims) <= sizing.chunk_above:
        return split_surplus([[claim] for claim in claims], max_tasks)
    count = sizing.task_count(len(claims))
    if max_tasks is not None:
        count = min(count, max_tasks)
    order = {id(claim): index for index, claim in enumerate(claims)}
    tasks: list[list[C]] = [[] for _ in range(count)]
    endpoints_of: list[set[str]] = [set() for _ in range(count)]
    for endpoint, piece in sorted(_pieces(claims, sizing, count), key=lambda item: -len(item[1])):
        target = min(
            (index for index in range(count) if endpoint not in endpoints_of[index]),
            key=lambda index: (len(tasks[index]), index),
        )
        tasks[target].extend(piece)
        endpoints_of[target].add(endpoint)
    for task in tasks:
        task.sort(key=lambda claim: order[id(claim)])
    tasks = sorted((task for task in tasks if task), key=lambda task: order[id(task[0])])
    return tasks, []


def _pieces(claims: Sequence[C], sizing: Sizing, tasks: int) -> list[tuple[str, list[C]]]:
    """Each endpoint's claims as one piece, or dealt in turn to several if well over a task's share."""
    by_endpoint: dict[str, list[C]] = {}
    for claim in claims:
        by_endpoint.setdefault(claim.endpoint, []).append(claim)
    share = len(claims) / tasks
    pieces = []
    for endpoint, own in by_endpoint.items():
        # Its share of the tasks, to the nearest whole: a piece is never far above a task's share.
        count = max(min(math.floor(len(own) / share + 0.5), tasks, sizing.in_flight(endpoint)), 1)
        pieces.extend((endpoint, own[turn::count]) for turn in range(count))
    return pieces


def split_surplus(tasks: list[list[C]], max_tasks: int | None) -> tuple[list[list[C]], list[C]]:
    """The first ``max_tasks`` tasks, and the claims of the rest (to go back to the queue)."""
    if max_tasks is None or len(tasks) <= max_tasks:
        return tasks, []
    return tasks[:max_tasks], [claim for task in tasks[max_tasks:] for claim in task]
