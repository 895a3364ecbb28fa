"""Adapters from our registry, registered with a running vLLM server through its runtime LoRA API.

An adapter version is fetched from storage into the local cache and checked against its sha256 (the
same copy our engine uses), then registered under its version id: `POST /v1/load_lora_adapter`
`{"lora_name": <id>, "lora_path": <folder>}`; requests then name that id as their `model`. At most
`vllm_max_loras` stay registered: beyond that the least recently used one that no request holds and
nobody pinned is unregistered (`POST /v1/unload_lora_adapter` `{"lora_name": <id>}`).

vLLM serves plain LoRA factors only (`VLLM_ENGINE_KINDS`): any other kind is refused with a 400 that
names it, and the registry sync never preloads one.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from sqlalchemy import or_, select

from core.db import session_scope
from core.errors import ApiError
from core.models import Adapter
from core.schemas.inference import AdapterRef
from core.serving_kinds import VLLM_ENGINE_KINDS
from core.settings import Settings
from worker.inference.adapter_cache import fetch_adapter
from worker.inference.metrics import ServingMetrics

log = logging.getLogger("patchbay.vllm")
ADMIN_TIMEOUT = httpx.Timeout(300, connect=5)


class AdapterLoadFailed(RuntimeError):
    """vLLM refused to load an adapter (its message says why)."""

    def __init__(self, adapter_id: str, message: str) -> None:
        super().__init__(f"adapter {adapter_id} could not be loaded by vLLM: {message}")


def unsupported_kinds(ref: AdapterRef) -> list[str]:
    """The kinds of `ref` that vLLM cannot serve."""
    return [kind for kind in ref.kinds if kind not in VLLM_ENGINE_KINDS]


class VllmService:
    """The adapters registered with one vLLM server (an `AdapterHost` for the registry sync)."""

    def __init__(self, settings: Settings, base_model_id: str, vllm_url: str) -> None:
        self.settings, self.base_model_id, self.vllm_url = settings, base_model_id, vllm_url
        self.cache_dir = settings.data_dir / "adapter-cache"
        self.max_adapters = max(1, settings.vllm_max_loras)
        self.on_change: Callable[[], None] | None = None
        self._http = httpx.Client(base_url=vllm_url, timeout=ADMIN_TIMEOUT)
        self._lock = threading.Lock()
        self._registered: collections.OrderedDict[str, Path] = collections.OrderedDict()  # oldest use first
        self._pinned: set[str] = set()
        self._held: collections.Counter[str] = collections.Counter()
        self._loading: dict[str, threading.Lock] = {}
        self._loads: collections.Counter[str] = collections.Counter()
        self.metrics = ServingMetrics(base_model_id)

    # -- the AdapterHost protocol ----------------------------------------------------------------

    def ensure(self, ref: AdapterRef, pinned: bool = False) -> str:
        """Register `ref` with vLLM unless it is (idempotent); returns the model name requests use."""
        self.check(ref)
        with self._load_lock(ref.id):
            with self._lock:
                present = ref.id in self._registered
                if present:
                    self._registered.move_to_end(ref.id)
            if not present:
                started = time.monotonic()
                with self._lock:
                    registered = set(self._registered)  # vLLM reloads these from their folders
                folder = fetch_adapter(ref, self.cache_dir, self.settings.storage_cache_bytes, keep=registered)
                self._register(ref.id, folder)
                self.metrics.adapter_loaded(time.monotonic() - started)
                with self._lock:
                    self._registered[ref.id] = folder
                    self._loads[ref.id] += 1
                log.info("registered adapter %s with vLLM", ref.id)
            if pinned:
                with self._lock:
                    self._pinned.add(ref.id)
        self._evict(keep=ref.id)
        if not present:
            self._changed()
        return ref.id

    def unload(self, adapter_id: str) -> bool:
        """Unregister an adapter (idempotent). Requests vLLM is running with it finish; new ones cannot use it."""
        with self._load_lock(adapter_id):  # after a registration under way, not before it
            with self._lock:
                present = self._registered.pop(adapter_id, None) is not None
                self._pinned.discard(adapter_id)
            if present:
                self._unregister(adapter_id)
                log.info("unregistered adapter %s from vLLM", adapter_id)
        if present:
            self._changed()
        return True

    def resident_ids(self) -> set[str]:
        """The adapter versions registered with vLLM now."""
        with self._lock:
            return set(self._registered)

    def ref_for(self, adapter_id: str) -> AdapterRef | None:
        """An adapter's reference from the registry, if it is live and of a kind vLLM serves."""
        with session_scope() as session:
            row = session.get(Adapter, adapter_id)
            ref = AdapterRef.of(row) if row is not None and row.status == "ready" else None
        return ref if ref is not None and not unsupported_kinds(ref) else None

    # -- requests --------------------------------------------------------------------------------

    def check(self, ref: AdapterRef) -> None:
        """Refuse an adapter this replica cannot serve: another base, or a kind vLLM lacks (400 either way)."""
        refused = unsupported_kinds(ref)
        if refused:
            raise ApiError(400, f"adapter {ref.id} is a {' + '.join(refused)} adapter, which vLLM cannot serve; "
                           "replicas of the patchbay engine serve it.", param="model", code="adapter_kind_unsupported")
        if ref.base_model != self.base_model_id:
            raise ApiError(400, f"adapter {ref.id} is for base '{ref.base_model}', but this replica serves "
                           f"'{self.base_model_id}'.", param="model", code="adapter_unavailable")

    def hold(self, ref: AdapterRef) -> str:
        """Make `ref` resident and keep it so until `release`; returns the model name for vLLM."""
        for _ in range(3):
            name = self.ensure(ref)
            with self._lock:
                if name in self._registered:  # not evicted by another request in between
                    self._held[name] += 1
                    return name
        raise ApiError(503, "the adapter could not stay resident; retry", code="adapter_busy",
                       headers={"Retry-After": "1"})

    def release(self, name: str) -> None:
        """A request that held `name` is done with it."""
        with self._lock:
            self._held[name] -= 1
            if self._held[name] <= 0:
                del self._held[name]
        self._evict()

    def forget(self, adapter_id: str) -> None:
        """vLLM no longer knows `adapter_id` (it answered 404 for it): drop our record, so it is registered again."""
        with self._lock:
            present = self._registered.pop(adapter_id, None) is not None
        if present:
            self._changed()

    def preload_pinned(self) -> None:
        """Register the adapters named in settings.pinned_adapters (ids or fine-tuned model names)."""
        for ref_text in filter(None, (r.strip() for r in self.settings.pinned_adapters.split(","))):
            with session_scope() as session:
                adapter_id = session.scalar(select(Adapter.id).where(
                    or_(Adapter.id == ref_text, Adapter.fine_tuned_model == ref_text), Adapter.status == "ready"))
            ref = self.ref_for(adapter_id) if adapter_id else None
            if ref is None:
                log.error("pinned adapter %s is not in the registry, or is of a kind vLLM cannot serve", ref_text)
                continue
            try:
                self.ensure(ref, pinned=True)
            except Exception:
                log.exception("pinned adapter %s could not be loaded", ref_text)

    def stats(self) -> dict:
        """`adapter_loads` (registrations with vLLM) in all and by adapter version."""
        with self._lock:
            return {"adapter_loads": sum(self._loads.values()), "loads_by_adapter": dict(self._loads)}

    def close(self) -> None:
        self._http.close()

    # -- vLLM's runtime LoRA API ----------------------------------------------------------------

    def _register(self, adapter_id: str, folder: Path) -> None:
        try:
            answer = self._http.post("/v1/load_lora_adapter", json={"lora_name": adapter_id, "lora_path": str(folder)})
        except httpx.HTTPError as exc:
            raise ApiError(503, f"vLLM is not reachable ({exc.__class__.__name__})", code="engine_unavailable",
                           headers={"Retry-After": "2"}) from exc
        if answer.status_code == 200:
            return
        message = _error_message(answer)
        if answer.status_code == 400 and "already been loaded" in message:
            return  # registered before we knew (a retry after a timeout): the same folder
        raise AdapterLoadFailed(adapter_id, message)

    def _unregister(self, adapter_id: str) -> None:
        try:
            answer = self._http.post("/v1/unload_lora_adapter", json={"lora_name": adapter_id})
        except httpx.HTTPError as exc:
            log.warning("could not unregister adapter %s from vLLM: %s", adapter_id, exc)
            return
        if answer.status_code not in (200, 404):  # 404: vLLM did not have it
            log.warning("vLLM refused to unregister adapter %s: %s", adapter_id, _error_message(answer))

    def _evict(self, keep: str | None = None) -> None:
        """Unregister least recently used adapters beyond the cap: never a held or pinned one, nor `keep` (the
        one just asked for); when every other one is held or pinned, the cap is exceeded until they are released."""
        victims = []
        with self._lock:
            spare = len(self._registered) - self.max_adapters
            for adapter_id in list(self._registered):
                if spare <= 0:
                    break
                if adapter_id == keep or adapter_id in self._held or adapter_id in self._pinned:
                    continue
                del self._registered[adapter_id]
                victims.append(adapter_id)
                spare -= 1
        for adapter_id in victims:
            self.metrics.adapter_evicted()
            log.info("adapter %s is the least recently used beyond %d; unregistering it", adapter_id,
                     self.max_adapters)
            self._unregister(adapter_id)
        if victims:
            self._changed()

    def _load_lock(self, adapter_id: str) -> threading.Lock:
        """One registration at a time per adapter version."""
        with self._lock:
            return self._loading.setdefault(adapter_id, threading.Lock())

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def _error_message(answer: httpx.Response) -> str:
    """The message of vLLM's error object, else the start of its answer."""
    try:
        payload = answer.json()
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return answer.text[:500]
