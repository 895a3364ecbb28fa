"""What `patchbay serve` needs beyond starting processes: ports for its replicas, and knowing when it is ready."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

PROGRESS_EVERY_SECONDS = 10.0


def replica_ports(first: int, count: int, host: str = "127.0.0.1") -> list[int]:
    """`first`, then the next `count - 1` ports above the previous one that nobody listens on."""
    ports = [first]
    while len(ports) < count:
        candidate = ports[-1] + 1
        while not _free(host, candidate):
            candidate += 1
        ports.append(candidate)
    return ports


def _free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def replica_threads_env(count: int) -> dict[str, str]:
    """Environment for one of `count` replicas on this machine: an even share of its cores.

    Each replica's thread pool otherwise takes every core, and a few replicas on a small machine spend
    their time fighting over them (on 2 cores, two replicas ran 20x slower). A user's OMP_NUM_THREADS wins.
    """
    if count <= 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // count))}


def probe_host(host: str) -> str:
    """Where to reach a server bound to `host` from this machine."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


@dataclass
class LocalReplica:
    """One inference child of `patchbay serve`: its base model and where it listens."""

    base_model: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def answers(url: str) -> bool:
    """Whether GET `url` answers 200 right now."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class ReadinessWatch:
    """Tells when a chat through the API would succeed: the API answers and every replica's `/readyz` is 200.

    Call `check()` as often as you like; it says what is still starting every PROGRESS_EVERY_SECONDS.
    """

    def __init__(self, api_url: str, replicas: list[LocalReplica], say: Callable[[str], None]) -> None:
        self.api_url, self.replicas, self.say = api_url, replicas, say
        self.ready = False
        self._api_up = False
        self._loaded: set[int] = set()
        self._next_progress = time.monotonic() + PROGRESS_EVERY_SECONDS

    def check(self) -> bool:
        """Probe what is not up yet; True once everything is (and stays True)."""
        if self.ready:
            return True
        self._api_up = self._api_up or answers(f"{self.api_url}/healthz")
        for replica in self.replicas:
            if replica.port not in self._loaded and answers(f"{replica.url}/readyz"):
                self._loaded.add(replica.port)
        self.ready = self._api_up and len(self._loaded) == len(self.replicas)
        if not self.ready and time.monotonic() >= self._next_progress:
            self._next_progress = time.monotonic() + PROGRESS_EVERY_SECONDS
            self.say(f"still starting: {', '.join(self.waiting_for())}")
        return self.ready

    def waiting_for(self) -> list[str]:
        """What is not up yet, in words."""
        waiting = [] if self._api_up else ["the API"]
        return waiting + [f"base model {r.base_model} is loading (port {r.port})" for r in self.replicas
                          if r.port not in self._loaded]
