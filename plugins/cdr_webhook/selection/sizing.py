"""How a run's CDRs become ``post_cdr`` tasks: one task per CDR, or chunks of one endpoint's CDRs.

The default (``cdrs_per_task`` ``auto``) sizes the tasks from the run's own share of each endpoint's
queue: an endpoint with up to ``chunk_above`` CDRs in the run gets a task per CDR (steady traffic:
each CDR its own line in the grid, its own tries and log); an endpoint with more gets them in as few
chunks as keep the run's task slots and the endpoint's in-flight slots busy (a burst, a backlog). A
task start costs far more than a POST, so fewer, larger chunks send faster, as long as every slot
that can send at once has one.

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

    :param chunk_above: An endpoint's CDRs in a run up to this many go one task each; more, in chunks.
    :param task_slots: The run's ``post_cdr`` tasks that can run at once: the smaller of
        ``max_active_posts_per_run`` and the executor's ``[core] parallelism``.
    :param in_flight: ``endpoint -> its in-flight limit`` (POSTs at once, across every task).
    """

    chunk_above: int
    task_slots: int
    in_flight: Callable[[str], int]


def chunk_counts(
    claims: Sequence[HasEndpoint], sizing: Sizing, max_tasks: int | None = None
) -> dict[str, int]:
    """
    How many tasks each endpoint's CDRs become; an endpoint absent from the result gets a task per CDR.

    An endpoint over ``chunk_above`` gets ``ceil(n / chunk_above)`` chunks, at most its share of the
    run's task slots (the slots divided among the endpoints that are chunked, at least one each) and
    at most its in-flight limit (a chunk sends at least one POST at a time: more chunks than slots
    would only wait). When that makes more than ``max_tasks`` tasks (many endpoints, each with a few
    CDRs), the threshold is lowered until the run's CDRs fit, rather than sending some back.
    """
    counts: dict[str, int] = {}
    for claim in claims:
        counts[claim.endpoint] = counts.get(claim.endpoint, 0) + 1
    for threshold in range(sizing.chunk_above, 0, -1):
        chunks = _chunks_over(counts, threshold, sizing)
        tasks = sum(chunks.get(endpoint, n) for endpoint, n in counts.items())
        if max_tasks is None or tasks <= max_tasks:
            break
    return chunks


def _chunks_over(counts: dict[str, int], threshold: int, sizing: Sizing) -> dict[str, int]:
    chunked = {endpoint: n for endpoint, n in counts.items() if n > threshold}
    share = max(sizing.task_slots // len(chunked), 1) if chunked else 1
    return {
        endpoint: max(min(math.ceil(n / threshold), share, sizing.in_flight(endpoint)), 1)
        for endpoint, n in chunked.items()
    }


def plan(claims: Sequence[C], sizing: Sizing, max_tasks: int | None = None) -> tuple[list[list[C]], list[C]]:
    """
    Group a run's claims into tasks by :func:`chunk_counts`, in the claims' order; the surplus apart.

    A chunked endpoint's CDRs are dealt to its chunks in turn (the first to the first chunk, the
    second to the second, ...), so chunks sending side by side together send the oldest first. The
    tasks are ordered by their first claim, so every endpoint gets an early task. Beyond
    ``max_tasks`` tasks, the later ones are returned apart, as the claims to give back to the queue.
    """
    counts = chunk_counts(claims, sizing, max_tasks)
    tasks: list[list[C]] = []
    dealt: dict[str, list[list[C]]] = {}
    turn: dict[str, int] = {}
    for claim in claims:
        endpoint = claim.endpoint
        if endpoint not in counts:
            tasks.append([claim])
            continue
        chunks = dealt.setdefault(endpoint, [])
        index = turn.get(endpoint, 0)
        if index == len(chunks):
            chunks.append([])
            tasks.append(chunks[index])
        chunks[index].append(claim)
        turn[endpoint] = (index + 1) % counts[endpoint]
    return split_surplus(tasks, max_tasks)


def split_surplus(tasks: list[list[C]], max_tasks: int | None) -> tuple[list[list[C]], list[C]]:
    """The first ``max_tasks`` tasks, and the claims of the rest (to go back to the queue)."""
    if max_tasks is None or len(tasks) <= max_tasks:
        return tasks, []
    return tasks[:max_tasks], [claim for task in tasks[max_tasks:] for claim in task]
