"""How a process of the run waits on another one, and how it works beside its own compute.

Every wait of the exchange on another process goes through `blocking`: the in-process test
harness (tests/fake_ensemble.py) runs the generator and the simulators as threads that take
turns, and replaces it to let the others run meanwhile. A wait never blocks for more than
POLL_S at a time, so that it notices when the manager has stopped the run.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, TypeVar

# How often a wait looks up to see whether the run was stopped meanwhile.
POLL_S = 0.5

T = TypeVar("T")


class Stopped(Exception):
    """The manager stopped the run while this process waited for the exchange."""


def blocking(wait: Callable[[], T]) -> T:
    return wait()


def wait_for(fetch: Callable[[], T | None], stopped: Callable[[], bool]) -> T:
    """What `fetch` (a wait of at most POLL_S, None when nothing came) returns first.
    Raises Stopped once the manager has stopped the run."""
    while (got := blocking(fetch)) is None:
        if stopped():
            raise Stopped()
    return got


class Background:
    """A thread that runs the jobs submitted to it in order, beside the compute. A job that
    raises skips the rest; `flush` raises its error in the submitting thread."""

    def __init__(self, name: str) -> None:
        self.busy_s = 0.0  # time spent in jobs
        self.error: Exception | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            t0 = time.perf_counter()
            try:
                if self.error is None:
                    job()
            except Exception as e:  # reported to the submitting thread by flush
                self.error = e
            finally:
                self.busy_s += time.perf_counter() - t0
                self._jobs.task_done()

    def flush(self) -> None:
        """Wait until every job submitted so far has run."""
        self._jobs.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)
