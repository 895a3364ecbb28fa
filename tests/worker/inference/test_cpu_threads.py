"""One-off torch work runs on a thread of its own that ends, and hands back its result or its error."""

from __future__ import annotations

import threading

import pytest

from worker.inference.cpu_threads import on_short_lived_thread


def test_returns_the_result_from_another_thread_that_has_ended():
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    assert on_short_lived_thread(work) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_reraises_the_error_on_the_calling_thread():
    def work() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        on_short_lived_thread(work)
