"""An ASGI app under a real uvicorn server in a thread, for tests that need real sockets and real streaming."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from tests.support.services import free_port


@contextmanager
def live_server(app, *, lifespan: bool = False, startup_seconds: float = 20,
                ready_path: str | None = None) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 while the block runs (its lifespan too, if asked); yields its base URL.

    With `ready_path`, it also waits (within `startup_seconds`) until GET `ready_path` answers 200.
    """
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on" if lifespan else "off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_seconds
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    url = f"http://127.0.0.1:{port}"
    try:
        while ready_path and httpx.get(url + ready_path, timeout=5).status_code != 200:
            assert time.monotonic() < deadline, f"{ready_path} did not answer 200 within {startup_seconds} s"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
