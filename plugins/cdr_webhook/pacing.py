"""The pace of an endpoint with a rate limit: how far apart its POSTs start. Pure: no database, no clock.

A receiver that allows ``N`` requests a second counts them in some one-second window, often a
sliding one. POSTs started exactly ``1/N`` apart put ``N + 1`` of them inside a closed one-second
window (the first and the last on its edges), and any jitter on the way can do the same. So the
``N`` sends of any run of ``N + 1`` are spread over ``1 + SLACK_SECONDS`` instead of one second:
whatever moves one POST against another by less than :data:`SLACK_SECONDS` in all (a sender waking
late, up to :data:`LATE_SECONDS`, then its clock reading, the network, the receiver's accept)
still leaves at most ``N`` in every one-second window at the receiver. The price is the throughput:
``N / (1 + SLACK_SECONDS)`` a second, 18.2 of a limit of 20.

A limit with a fraction above 1 paces its whole part (``2.5`` sends at most 2 in any second); below 1
it paces ``1 / limit`` seconds (``0.5``: one POST every 2.2 s).
"""

from __future__ import annotations

import math

#: The highest rate limit an endpoint may set: above it, one database reservation per batch and a
#: thread's wake-up per POST are the bottleneck, not the receiver.
MAX_RATE = 1000
#: What the spacing leaves for jitter: ``N`` spacings last ``1 + SLACK_SECONDS`` seconds.
SLACK_SECONDS = 0.1
#: A sender reaching its send time later than this gives it up and reserves another (a POST sent
#: late would close up on the next one's): a part of :data:`SLACK_SECONDS`, the rest is for the way.
LATE_SECONDS = 0.04
#: A task reserves this much of an endpoint's time at once (at least one send): one database round
#: trip per batch, not per POST, while others' reservations still interleave with its own.
BATCH_SECONDS = 0.25


def spacing(rate: float) -> float:
    """Seconds between two POSTs to an endpoint limited to ``rate`` a second (see the module's note)."""
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"a rate limit is a positive number of POSTs a second, not {rate!r}")
    whole = math.floor(rate) if rate >= 1 else rate
    return (1 + SLACK_SECONDS) / whole


def batch(rate: float) -> int:
    """How many send times a task reserves at once: :data:`BATCH_SECONDS` of the endpoint's pace."""
    return max(1, math.floor(BATCH_SECONDS / spacing(rate)))


def fitting(wanted: int, *, first_in: float, spacing: float, within: float) -> int:
    """
    How many of ``wanted`` send times, the first ``first_in`` seconds from now and each ``spacing``
    after the one before, start no later than ``within`` seconds from now.
    """
    if wanted < 1 or first_in > within:
        return 0
    return min(wanted, math.floor((within - first_in) / spacing + 1e-9) + 1)


def most_in_window(times: list[float], window: float = 1.0) -> int:
    """The most of ``times`` (seconds, any order) inside any closed window of ``window`` seconds."""
    ordered = sorted(times)
    most, start = 0, 0
    for end, at in enumerate(ordered):
        while at - ordered[start] > window:
            start += 1
        most = max(most, end - start + 1)
    return most
