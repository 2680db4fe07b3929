"""The deployment teardown's leftover check (demo.stack): live processes count, zombies do not."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from demo.stack import end_sessions, running_in

# Starts a child that exits at once and is never reaped (a zombie), then lingers itself.
PARENT_OF_A_ZOMBIE = "import subprocess, time; subprocess.Popen(['true']); time.sleep(60)"


def wait_for_zombie_child(pid: int) -> psutil.Process:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children()
        if children and children[0].status() == psutil.STATUS_ZOMBIE:
            return children[0]
        time.sleep(0.05)
    raise AssertionError("the child did not become a zombie")


def test_a_live_process_is_a_leftover_and_is_killed_but_a_zombie_is_not():
    parent = subprocess.Popen([sys.executable, "-c", PARENT_OF_A_ZOMBIE], start_new_session=True)
    try:
        zombie = wait_for_zombie_child(parent.pid)
        assert [proc.pid for proc in running_in({parent.pid})] == [parent.pid]

        leftovers = end_sessions({parent.pid}, grace=0.5)

        assert [int(line.split()[0]) for line in leftovers] == [parent.pid]
        assert zombie.pid not in [int(line.split()[0]) for line in leftovers]
        assert parent.wait(timeout=10) == -9
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_processes_that_exit_within_the_grace_period_are_not_leftovers():
    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"], start_new_session=True)
    try:
        assert end_sessions({quick.pid}, grace=10) == []
    finally:
        quick.wait(timeout=10)
