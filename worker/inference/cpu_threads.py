"""Keep the decode loop's OpenMP threads spinning: run one-off torch work on threads that end.

Every thread that runs a parallel torch op gets an OpenMP thread pool of its own, which lives until
the thread exits. GNU OpenMP counts all pools' threads, and once they outnumber the CPUs it stops
letting idle workers spin between parallel regions: each region then waits for workers to wake up.
On 2 cores the scheduler thread's matmuls kept 1.5 cores busy instead of 2, and decode steps took
about a third longer, only because the thread that loaded the model (or an earlier test) still held a pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_short_lived_thread(work: Callable[[], T], name: str = "torch-oneoff") -> T:
    """Run `work` on a new thread, wait for it, and return its result (or raise its exception)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # re-raised on the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
