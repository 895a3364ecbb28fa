"""The adapter manager: which adapters (of any kind) sit in which slots, with explicit states and LRU eviction.

States follow LoRAX: `downloading` while the caller's `fetch()` runs, `loading` while the folder is
validated and copied into a slot, then `ready`, or `errored` with the message. At most
`max_loaded_adapters` adapters hold a slot; when a new one needs a slot, the least recently used
ready adapter is evicted, except pinned ones and ones held by in-flight requests (`acquire`/`release`).
When every slot is held by requests, a load waits (up to `slot_wait_seconds`) for one to finish.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from worker.formats.files import AdapterLoadError
from worker.inference.adapter_slots import AdapterSlots
from worker.inference.metrics import ServingMetrics

logger = logging.getLogger(__name__)


class AdapterState(StrEnum):
    """Where an adapter is in its life cycle."""

    DOWNLOADING = "downloading"
    LOADING = "loading"
    READY = "ready"
    ERRORED = "errored"


class AdapterNotReadyError(LookupError):
    """The adapter is not loaded (or not ready yet) and cannot serve a request."""


SLOT_WAIT_SECONDS = 30.0
"""How long a load waits for an in-flight request to free a slot before giving up."""


class AdapterCapacityError(AdapterLoadError):
    """Every adapter slot is held by a pinned adapter or by in-flight requests (for longer than the wait)."""


class AdapterPinLimitError(AdapterCapacityError):
    """Pinning one more adapter would take more than half of the slots."""


class AdapterInUseError(RuntimeError):
    """The adapter cannot be unloaded while requests are using it."""


@dataclass(frozen=True)
class AdapterStatus:
    """A snapshot of one adapter's state."""

    name: str
    state: AdapterState
    slot: int | None
    pinned: bool
    in_use: int  # in-flight requests holding it
    rank: int | None  # the LoRA rank; None for kinds without LoRA factors
    path: str | None
    error: str | None
    kind: str | None = None  # e.g. "lora", "ia3", "prefix_tuning", "lora+sparse"

    def as_dict(self) -> dict:
        """JSON-ready form (the state as its string value)."""
        return {**asdict(self), "state": self.state.value}


@dataclass
class _Entry:
    name: str
    state: AdapterState
    pinned: bool = False
    slot: int | None = None
    refcount: int = 0
    rank: int | None = None
    path: Path | None = None
    error: str | None = None
    last_used: int = 0
    kind: str | None = None

    def status(self) -> AdapterStatus:
        return AdapterStatus(
            name=self.name,
            state=self.state,
            slot=self.slot,
            pinned=self.pinned,
            in_use=self.refcount,
            rank=self.rank,
            path=str(self.path) if self.path is not None else None,
            error=self.error,
            kind=self.kind,
        )


def _why_busy(entry: _Entry) -> str:
    if entry.pinned:
        return "pinned"
    if entry.refcount:
        return f"{entry.refcount} in-flight request{'s' if entry.refcount != 1 else ''}"
    return entry.state.value


class AdapterManager:
    """Loads adapters into the slots of an `AdapterSlots` on demand; thread-safe.

    `on_change`, when set, is called (without the lock) after an adapter is loaded into a slot or unloaded,
    so a replica can tell the fleet at once what is resident. `metrics`, when given, counts loads (and their
    time) and evictions.
    """

    def __init__(self, bank: AdapterSlots, max_loaded_adapters: int, metrics: ServingMetrics | None = None) -> None:
        if not 1 <= max_loaded_adapters <= bank.n_slots:
            raise ValueError(f"max_loaded_adapters must be between 1 and the bank's {bank.n_slots} slots")
        self._bank = bank
        self.max_loaded_adapters = max_loaded_adapters
        self.max_pinned = max_loaded_adapters // 2
        self._entries: dict[str, _Entry] = {}
        self._changed = threading.Condition()
        self._clock = itertools.count(1)
        self._loads: collections.Counter[str] = collections.Counter()
        self.on_change: Callable[[], None] | None = None
        self._metrics = metrics
        self.slot_wait_seconds = SLOT_WAIT_SECONDS

    def ensure(self, name: str, fetch: Callable[[], Path | str], pinned: bool = False) -> AdapterStatus:
        """Make `name` ready, blocking until it is; idempotent (a ready adapter is only marked used).

        `fetch()` returns the local adapter folder (downloading it if needed); it runs only when the
        adapter is not already loaded or being loaded by another thread. A pinned adapter is never
        evicted. Raises `AdapterLoadError` (the adapter is then `errored`, and a later call retries).
        """
        waited_on: _Entry | None = None
        with self._changed:
            if pinned:
                self._check_pin_room(name)
            while True:
                entry = self._entries.get(name)
                if entry is not None and entry is waited_on and entry.state is AdapterState.ERRORED:
                    raise AdapterLoadError(entry.error)
                if entry is None or entry.state is AdapterState.ERRORED:
                    entry = _Entry(name=name, state=AdapterState.DOWNLOADING, pinned=pinned)
                    self._entries[name] = entry
                    break
                if entry.state is AdapterState.READY:
                    entry.pinned = entry.pinned or pinned
                    entry.last_used = next(self._clock)
                    return entry.status()
                waited_on = entry
                self._changed.wait()
        return self._load(entry, fetch)

    def _load(self, entry: _Entry, fetch: Callable[[], Path | str]) -> AdapterStatus:
        started = time.monotonic()
        try:
            folder = Path(fetch())
        except Exception as exc:
            raise self._fail(entry, f"fetching adapter {entry.name!r} failed: {exc}") from exc
        with self._changed:
            entry.state, entry.path = AdapterState.LOADING, folder
            self._changed.notify_all()
        try:
            adapter = self._bank.read_adapter(folder)
            with self._changed:
                entry.slot = self._reserve_slot(entry)
            self._bank.write_slot(entry.slot, adapter)
        except AdapterLoadError as exc:
            raise self._fail(entry, str(exc), type(exc)) from exc
        except Exception as exc:
            raise self._fail(entry, f"loading adapter {entry.name!r} failed: {exc}") from exc
        with self._changed:
            entry.state, entry.rank, entry.kind = AdapterState.READY, adapter.rank, adapter.kind
            entry.last_used = next(self._clock)
            self._loads[entry.name] += 1
            self._changed.notify_all()
            logger.info("adapter %s (%s) ready in slot %d", entry.name, adapter.kind, entry.slot)
            status = entry.status()
        if self._metrics is not None:
            self._metrics.adapter_loaded(time.monotonic() - started)
        self._notify_change()
        return status

    def _notify_change(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # a listener's failure never fails a load
                logger.warning("adapter change listener failed", exc_info=True)

    def _fail(
        self, entry: _Entry, message: str, error_type: type[AdapterLoadError] = AdapterLoadError
    ) -> AdapterLoadError:
        with self._changed:
            entry.state, entry.error, entry.slot = AdapterState.ERRORED, message, None
            self._changed.notify_all()
        logger.warning("adapter %s errored: %s", entry.name, message)
        return error_type(message)

    def _reserve_slot(self, entry: _Entry) -> int:
        """A free slot, evicting the least recently used idle adapter if needed (lock held).

        While requests hold every unpinned slot, waits up to `slot_wait_seconds` for one to be released.
        """
        deadline = time.monotonic() + self.slot_wait_seconds
        while True:
            taken = {e.slot for e in self._entries.values() if e.slot is not None}
            free = [slot for slot in range(self.max_loaded_adapters) if slot not in taken]
            if free:
                return free[0]
            holders = [e for e in self._entries.values() if e.slot is not None and not e.pinned and e is not entry]
            idle = [e for e in holders if e.state is AdapterState.READY and e.refcount == 0]
            if idle:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not holders:
                busy = ", ".join(f"{e.name} ({_why_busy(e)})" for e in self._entries.values() if e.slot is not None)
                raise AdapterCapacityError(
                    f"all {self.max_loaded_adapters} adapter slots are busy or pinned ({busy}); "
                    f"cannot load {entry.name!r} now, retry when requests finish"
                )
            self._changed.wait(remaining)
        victim = min(idle, key=lambda e: e.last_used)
        del self._entries[victim.name]
        if self._metrics is not None:
            self._metrics.adapter_evicted()
        logger.info("evicting adapter %s from slot %d to load %s", victim.name, victim.slot, entry.name)
        return victim.slot

    def unload(self, name: str) -> bool:
        """Remove `name` and free its slot; idempotent (False when it was not there).

        Waits for a download or load in progress; raises `AdapterInUseError` while requests hold it.
        """
        with self._changed:
            while (entry := self._entries.get(name)) is not None and entry.state in (
                AdapterState.DOWNLOADING,
                AdapterState.LOADING,
            ):
                self._changed.wait()
            if entry is None:
                return False
            if entry.refcount > 0:
                raise AdapterInUseError(f"adapter {name!r} is used by {entry.refcount} in-flight requests")
            if entry.slot is not None:
                self._bank.clear_slot(entry.slot)
            del self._entries[name]
            self._changed.notify_all()
        self._notify_change()
        return True

    def set_pinned(self, name: str, pinned: bool) -> None:
        """Pin (never evict) or unpin a known adapter."""
        with self._changed:
            entry = self._entries.get(name)
            if entry is None:
                raise AdapterNotReadyError(f"adapter {name!r} is not loaded")
            if pinned:
                self._check_pin_room(name)
            entry.pinned = pinned

    def _check_pin_room(self, name: str) -> None:
        """Pinned adapters may hold at most half of the slots, so every team's adapters can still load (lock held)."""
        entry = self._entries.get(name)
        if entry is not None and entry.pinned:
            return
        pinned = sum(1 for e in self._entries.values() if e.pinned)
        if pinned >= self.max_pinned:
            raise AdapterPinLimitError(
                f"cannot pin {name!r}: pinned adapters may take at most {self.max_pinned} of the "
                f"{self.max_loaded_adapters} slots ({pinned} pinned), so other teams' adapters can always load")

    def acquire(self, name: str) -> int:
        """Hold a ready adapter for one request (it cannot be evicted until `release`); returns its slot."""
        with self._changed:
            entry = self._entries.get(name)
            if entry is None or entry.state is not AdapterState.READY:
                state = "not loaded" if entry is None else entry.state.value
                raise AdapterNotReadyError(f"adapter {name!r} is {state}; load it first")
            entry.refcount += 1
            entry.last_used = next(self._clock)
            return entry.slot

    def release(self, name: str) -> None:
        """Drop one request's hold taken by `acquire`."""
        with self._changed:
            entry = self._entries.get(name)
            if entry is not None and entry.refcount > 0:
                entry.refcount -= 1
                entry.last_used = next(self._clock)
                self._changed.notify_all()

    def status(self, name: str) -> AdapterStatus | None:
        """The adapter's current status, or None when unknown."""
        with self._changed:
            entry = self._entries.get(name)
            return entry.status() if entry is not None else None

    def loaded(self) -> list[str]:
        """Names of the adapters that hold a slot (ready or being copied in)."""
        with self._changed:
            return [e.name for e in self._entries.values() if e.slot is not None]

    def load_counts(self) -> dict[str, int]:
        """How many times each adapter was loaded into a slot from its folder (reloads after eviction included)."""
        with self._changed:
            return dict(self._loads)

    def states(self) -> dict[str, dict]:
        """Every known adapter's status as JSON-ready dicts, by name (for a status endpoint)."""
        with self._changed:
            return {name: entry.status().as_dict() for name, entry in self._entries.items()}
