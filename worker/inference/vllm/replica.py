"""A vLLM replica's life: announced as `loading`, vLLM started beside it, `ready` once vLLM answers.

The replica's own HTTP server is up from the first moment. In the background it finds vLLM's python, the
base model's folder (converting the default SmolLM2 once where this environment can), starts vLLM's
server and waits for its /health; then it follows the registry (`RegistrySync`, as our engine does) and
announces itself `ready`. Should vLLM exit later, the replica leaves the fleet and says why. At shutdown
the row is retired first, so that routing forgets the replica before vLLM stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path

from core.db import session_scope
from core.errors import ApiError, unavailable
from core.models import BaseModelRecord
from core.schemas.replicas import ReplicaStatus
from core.serving_kinds import VLLM_ENGINE_KINDS
from core.settings import Settings
from worker.inference.request_counter import RequestCounter
from worker.inference.vllm.environment import child_environment, require_vllm, vllm_device
from worker.inference.vllm.process import (
    MAX_NUM_SEQS,
    VllmProcess,
    VllmStartError,
    free_port,
    option_value,
    server_arguments,
)
from worker.inference.vllm.relay import VllmRelay
from worker.inference.vllm.service import VllmService

log = logging.getLogger("patchbay.vllm")
START_SECONDS = 900.0
"""How long vLLM may take to answer /health (a large model on a GPU compiles and captures graphs)."""
BASE_WAIT_POLL_SECONDS = 5.0
LOADING_RETRY_AFTER_SECONDS = 2


def base_model_folder(settings: Settings, deadline: float) -> Path:
    """The local folder of the replica's base model.

    The default SmolLM2 is converted here once if this environment can (it needs torch); one that cannot
    (the vLLM image installs only Patchbay's API layer) waits until a replica of our engine has converted
    and registered it. Any other base must be registered (`patchbay models add ID PATH`).
    """
    from worker.base_models import DEFAULT_BASE_MODEL, ensure_default_base_model

    base_id = settings.inference_base_model
    waiting = False
    while True:
        if base_id == DEFAULT_BASE_MODEL:
            try:
                ensure_default_base_model(settings.data_dir)
            except ImportError:
                waiting = True
        with session_scope() as session:
            record = session.get(BaseModelRecord, base_id)
            folder = Path(record.path) if record is not None else None
        if folder is not None and (folder / "config.json").is_file():
            return folder
        if not waiting:
            raise RuntimeError(f"base model '{base_id}' is not registered (patchbay models add ID PATH)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"base model '{base_id}' was not registered in time; this environment cannot convert "
                               "it (no torch): start a replica of the patchbay engine, or `patchbay models add`")
        log.info("waiting for base model %s: a replica of the patchbay engine converts and registers it", base_id)
        time.sleep(BASE_WAIT_POLL_SECONDS)


class VllmReplica:
    """The replica's state: vLLM's process, the adapter service once vLLM answers, presence and counters.

    `exit_on_failure`: when vLLM cannot start (or exits later), the process exits 1, which is what
    `patchbay inference --engine vllm` wants; otherwise the replica keeps answering 503 with the error.
    """

    def __init__(self, settings: Settings, *, exit_on_failure: bool = False) -> None:
        from worker.inference.presence import ReplicaPresence

        self.settings, self.base_model_id = settings, settings.inference_base_model
        self.exit_on_failure = exit_on_failure
        self.process: VllmProcess | None = None
        self.service: VllmService | None = None
        self.relay: VllmRelay | None = None
        self.error: str | None = None
        self.requests = RequestCounter()
        self.max_batch = MAX_NUM_SEQS
        # Without an advertised URL nobody could reach a registered row: such a replica is static only.
        self.presence = ReplicaPresence(self.status, settings) if settings.inference_advertise_url else None
        self._sync = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        """Announce the replica as `loading`, then start vLLM in the background."""
        if self.presence is not None:
            await asyncio.to_thread(self.presence.start)
        self._task = asyncio.create_task(self._boot(), name="vllm-boot")

    async def _boot(self) -> None:
        from worker.inference.registry_sync import RegistrySync

        started = time.monotonic()
        try:
            python, env, folder, device = await asyncio.to_thread(self._prepare, started + START_SECONDS)
            arguments = server_arguments(self.settings, folder, self.base_model_id, free_port(), device)
            self.max_batch = int(option_value(arguments, "--max-num-seqs") or MAX_NUM_SEQS)
            process = self.process = VllmProcess(python, arguments, env)
            process.start()  # on the event loop's thread, which outlives vLLM (see process.py)
            await process.wait_healthy(START_SECONDS - (time.monotonic() - started))
            service = VllmService(self.settings, self.base_model_id, process.base_url)
            await asyncio.to_thread(service.preload_pinned)
            sync = await asyncio.to_thread(RegistrySync, service, self.settings)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(exc)
            return
        self.relay = VllmRelay(process.base_url)
        sync.start()
        self._sync, self.service = sync, service
        if self.presence is not None:
            service.on_change = getattr(self.presence, "nudge", None)
            await asyncio.to_thread(self.presence.announce)  # `ready` before /readyz says so
        log.info("vLLM serves %s after %.1f s; replica ready", self.base_model_id, time.monotonic() - started)
        while process.running():
            await asyncio.sleep(1)
        if not self._stopping:
            await self._failed(VllmStartError(f"vLLM's server exited (status {process.proc.returncode}):\n"
                                              f"{process.tail()}"))

    def _prepare(self, deadline: float) -> tuple[Path, dict[str, str], Path, str]:
        python = require_vllm(self.settings)
        folder = base_model_folder(self.settings, deadline)
        env = child_environment(python)
        device = vllm_device(python, env)
        log.info("vLLM runs on %s from %s (LD_PRELOAD=%s)", device, python, env.get("LD_PRELOAD", ""))
        return python, env, folder, device

    async def _failed(self, exc: Exception) -> None:
        log.error("vLLM replica of %s failed: %s", self.base_model_id, exc)
        self.error = f"vLLM could not serve '{self.base_model_id}': {exc}"
        self.service = None
        if self.presence is not None:
            await asyncio.to_thread(self.presence.stop)
        if self.process is not None:
            await asyncio.to_thread(self.process.stop, 5)
        if self.exit_on_failure:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    async def stop(self) -> None:
        """Retire the row, stop following the registry, stop vLLM."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.presence is not None:
            await asyncio.to_thread(self.presence.stop)
        if self._sync is not None:
            await asyncio.to_thread(self._sync.stop)
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)
        if self.relay is not None:
            await self.relay.close()
        if self.service is not None:
            self.service.close()

    @property
    def state(self) -> str:
        """`loading` until vLLM answers, then `ready`."""
        return "ready" if self.service is not None else "loading"

    def require_service(self) -> VllmService:
        """The adapter service; 503 with Retry-After while vLLM starts (or after it failed)."""
        if self.service is not None:
            return self.service
        if self.error is not None:
            raise ApiError(503, self.error, code="model_load_failed")
        raise unavailable(f"vLLM is still starting on this replica of '{self.base_model_id}'; retry shortly.",
                          "model_loading", retry_after=LOADING_RETRY_AFTER_SECONDS)

    def status(self) -> ReplicaStatus:
        """What this replica says of itself (its row's content and `GET /status`)."""
        service, process = self.service, self.process
        stats = {**self.requests.snapshot(),
                 **(service.stats() if service is not None else {"adapter_loads": 0, "loads_by_adapter": {}}),
                 "vllm_url": process.base_url if process is not None else None}
        if self.error is not None:
            stats["error"] = self.error
        return ReplicaStatus(
            url=self.settings.inference_advertise_url or "", base_model=self.base_model_id, engine="vllm",
            state=self.state, kinds=list(VLLM_ENGINE_KINDS), max_resident_adapters=max(1, self.settings.vllm_max_loras),
            max_batch=self.max_batch, resident_adapters=sorted(service.resident_ids()) if service is not None else [],
            load=self.requests.in_flight, stats=stats)
