"""Waiting for another process to reach a point, without reading the clock.

The tests that pause a subprocess at a named point (a marker file, a running compiler) poll for it. The bound is a
number of polls, a hang guard only: nothing here measures or compares how long anything took, so a busy machine
can make a wait longer but never makes a test fail by timing.
"""
from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable

POLL_SECONDS = 0.05
MAX_POLLS = 4800  # at least 240 s of pacing: a subprocess that imports torch on shared cores


def wait_until(condition: Callable[[], object], what: str, process: subprocess.Popen | None = None) -> None:
    """Return once ``condition()`` is true; fail if ``process`` ended first or the condition never came."""
    pause = threading.Event()
    for _ in range(MAX_POLLS):
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {process.communicate()}")
        pause.wait(POLL_SECONDS)
    if process is not None:
        process.kill()
    raise AssertionError(f"{what} never happened")
