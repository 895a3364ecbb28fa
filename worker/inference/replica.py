"""One inference replica's life in the fleet: announced while its base model loads, ready once it answers.

The HTTP server is up from the first moment; the base model loads on a background thread. Until it is
loaded, generation and admin requests get 503 with Retry-After, `/readyz` says `loading` and the
replica's row says `state: loading`, so the API holds requests for this base instead of sending them.
Once loaded, the row says `ready` at once (before `/readyz` turns 200), so whoever waits on `/readyz`
knows the API can route to it. The row is renewed by heartbeat, again as soon as what is resident
changes, and retired at shutdown.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable

from core.errors import ApiError, unavailable
from core.schemas.replicas import ReplicaStatus
from core.serving_kinds import PATCHBAY_ENGINE_KINDS
from core.settings import Settings
from worker.inference.request_counter import RequestCounter
from worker.inference.service import InferenceService

log = logging.getLogger("patchbay.replica")
LOADING_RETRY_AFTER_SECONDS = 2


class Replica:
    """The replica's state: its service once the base is loaded, its presence in the fleet and its counters.

    `exit_on_failure`: when the base cannot be loaded, the process exits 1 (what `patchbay inference`
    wants: nothing else runs yet); otherwise the replica keeps answering 503 with the error.
    """

    def __init__(self, settings: Settings, *, exit_on_failure: bool = False,
                 build_service: Callable[[Settings], InferenceService] | None = None) -> None:
        from worker.inference.presence import ReplicaPresence

        self.settings, self.base_model_id = settings, settings.inference_base_model
        self.exit_on_failure, self._build_service = exit_on_failure, build_service or InferenceService
        self.service: InferenceService | None = None
        self.error: str | None = None
        self.requests = RequestCounter()
        self.ready = threading.Event()
        # Static only (PATCHBAY_INFERENCE_URL): without an advertised URL nobody could reach its row, and a
        # merged deployment serves one adapter only, which a row cannot say (routing would send it anything).
        registers = bool(settings.inference_advertise_url) and not settings.merged_adapter
        self.presence = ReplicaPresence(self.status, settings) if registers else None
        self._sync = None
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        """Announce the replica as `loading`, then load the base model in the background."""
        if self.presence is not None:
            self.presence.start()
        elif self.settings.merged_adapter:
            log.warning("serving adapter %s merged: this replica is not registered in the fleet; list it in "
                        "PATCHBAY_INFERENCE_URL of an API meant for it", self.settings.merged_adapter)
        threading.Thread(target=self._load, name="base-model-load", daemon=True).start()

    def _load(self) -> None:
        from worker.inference.registry_sync import RegistrySync

        log.info("loading base model %s", self.base_model_id)
        try:
            service = self._build_service(self.settings)
            service.preload_pinned()
            sync = RegistrySync(service, self.settings)
        except Exception as exc:
            self._failed(exc)
            return
        with self._lock:
            if self._stopping:
                service.engine.close()
                return
            self.service, self._sync = service, sync
            sync.start()
            if self.presence is not None:
                service.engine.adapters.on_change = self.presence.nudge
                self.presence.announce()  # `ready` before /readyz says so
        self.ready.set()
        log.info("base model %s loaded; replica ready", self.base_model_id)

    def _failed(self, exc: Exception) -> None:
        log.exception("base model %s could not be loaded", self.base_model_id)
        if self.presence is not None:
            self.presence.stop()
        self.error = f"the base model '{self.base_model_id}' could not be loaded: {exc}"
        if self.exit_on_failure:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    def stop(self) -> None:
        """Retire the row, stop following the registry and stop the engine (a load still running is dropped)."""
        with self._lock:
            self._stopping = True
            service, sync = self.service, self._sync
        if self.presence is not None:
            self.presence.stop()
        if sync is not None:
            sync.stop()
        if service is not None:
            service.engine.close()

    @property
    def state(self) -> str:
        """`loading` until the base model is loaded, then `ready`."""
        return "ready" if self.service is not None else "loading"

    def require_service(self) -> InferenceService:
        """The loaded service; 503 with Retry-After while the base is loading (or after it failed to)."""
        if self.service is not None:
            return self.service
        if self.error is not None:
            raise ApiError(503, self.error, code="model_load_failed")
        raise unavailable(f"The base model '{self.base_model_id}' is still loading on this replica; retry shortly.",
                          "model_loading", retry_after=LOADING_RETRY_AFTER_SECONDS)

    def status(self) -> ReplicaStatus:
        """What this replica says of itself (its row's content and `GET /status`)."""
        service = self.service
        engine_stats, loads, resident, max_batch = {}, {}, [], self.settings.inference_max_batch_size
        if service is not None:
            engine, adapters = service.engine, service.engine.adapters
            engine_stats, loads, max_batch = engine.stats(), adapters.load_counts(), engine.max_batch_size
            resident = sorted(name for name, state in adapters.states().items() if state["state"] != "errored")
            if service.merged_adapter_id is not None:
                resident = [service.merged_adapter_id]
        return ReplicaStatus(
            url=self.settings.inference_advertise_url or "", base_model=self.base_model_id, engine="patchbay",
            state=self.state, kinds=list(PATCHBAY_ENGINE_KINDS),
            max_resident_adapters=self.settings.max_loaded_adapters, max_batch=max_batch, resident_adapters=resident,
            load=engine_stats.get("running", 0) + engine_stats.get("waiting", 0),
            stats={**self.requests.snapshot(), "adapter_loads": sum(loads.values()), "loads_by_adapter": loads,
                   **engine_stats})
