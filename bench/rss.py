"""The peak resident memory of an Airflow's task processes, sampled in a thread while a run goes."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence


class RssSampler:
    """Samples, every ``interval`` s, the RSS of the task processes under a scheduler.

    The scheduler's children are its executor workers (LocalExecutor) and its own helpers; each task
    try runs in a process forked below a worker (the Task SDK's supervisor forks the task runner).
    Those deeper descendants are the task processes.
    """

    def __init__(self, scheduler_pid: int, interval: float = 0.1, also: Sequence[int] = ()) -> None:
        """:param also: Processes counted whole, with their descendants (the triggerer)."""
        self.root = psutil.Process(scheduler_pid)
        self.also = [psutil.Process(pid) for pid in also]
        self.interval = interval
        self.peak_one = 0
        self.peak_sum = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def task_processes(self) -> Iterator[psutil.Process]:
        for child in self.root.children():
            try:
                yield from child.children(recursive=True)
            except psutil.Error:
                continue
        for proc in self.also:
            try:
                yield proc
                yield from proc.children(recursive=True)
            except psutil.Error:
                continue

    def sample(self) -> None:
        total = 0
        for proc in self.task_processes():
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            self.peak_one = max(self.peak_one, rss)
        self.peak_sum = max(self.peak_sum, total)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
