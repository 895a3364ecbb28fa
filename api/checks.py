"""CPU-heavy checks of uploads (dataset validation, archive inspection) in worker processes.

They run in a small process pool, so neither the event loop nor the GIL waits on a 64 MB line or an
archive bomb, and at most `check_workers` run at once; further checks queue for a free process.
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import TypeVar

from core.errors import unavailable
from core.settings import get_settings

T = TypeVar("T")
_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None


def _executor() -> ProcessPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            # spawn, not fork: the API process has threads (the threadpool, the dispatcher).
            _pool = ProcessPoolExecutor(max_workers=max(1, get_settings().check_workers),
                                        mp_context=multiprocessing.get_context("spawn"))
        return _pool


def _discard(broken: ProcessPoolExecutor) -> None:
    global _pool
    with _lock:
        if _pool is broken:
            _pool = None
    broken.shutdown(wait=False, cancel_futures=True)


async def run_check(check: Callable[..., T], *args, **kwargs) -> T:
    """Run `check(*args, **kwargs)` in a checker process and return its result (or raise its exception)."""
    pool = _executor()
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, partial(check, *args, **kwargs))
    except BrokenProcessPool:
        _discard(pool)
        raise unavailable("The upload checker stopped unexpectedly; retry the request.", "checker_unavailable")


@atexit.register
def _shutdown() -> None:
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
