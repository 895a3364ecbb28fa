"""The inference server's state: one engine on one base model, and adapters fetched from storage."""

from __future__ import annotations

import logging
from pathlib import Path

from core.db import session_scope
from core.models import Adapter, BaseModelRecord
from core.schemas.inference import AdapterRef
from core.settings import Settings
from worker.inference.adapter_cache import AdapterFetchError, fetch_adapter
from worker.inference.metrics import ServingMetrics

log = logging.getLogger("patchbay.inference")
"""Generations the engine runs in one batch (what a replica advertises as `max_batch`)."""


class InferenceService:
    """Loads the base once and serves any adapter version by id, fetching it on first use."""

    def __init__(self, settings: Settings) -> None:
        from worker.base_models import DEFAULT_BASE_MODEL, ensure_default_base_model
        from worker.inference.engine import InferenceEngine

        self.settings = settings
        if settings.inference_base_model == DEFAULT_BASE_MODEL:
            ensure_default_base_model(settings.data_dir)
        with session_scope() as session:
            base = session.get(BaseModelRecord, settings.inference_base_model)
            if base is None:
                raise RuntimeError(f"base model '{settings.inference_base_model}' is not registered "
                                   "(patchbay models add ID PATH)")
            self.base_model_id, base_path = base.id, Path(base.path)
        self.cache_dir = settings.data_dir / "adapter-cache"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.merged_adapter_id: str | None = None
        quantization = settings.inference_quantization
        if settings.merged_adapter:
            base_path = self._merged_base(base_path, settings.merged_adapter)
            quantization = "none"
        self.engine = InferenceEngine(base_path, quantization=quantization,
                                      max_loaded_adapters=settings.max_loaded_adapters,
                                      max_lora_rank=settings.max_lora_rank,
                                      max_batch_size=settings.inference_max_batch_size,
                                      prefix_cache_bytes=settings.inference_prefix_cache_mb * 2**20,
                                      metrics=ServingMetrics(self.base_model_id))

    def _merged_base(self, base_path: Path, adapter_ref: str) -> Path:
        """A full-precision copy of the base with one adapter merged in (built once, then reused)."""
        from worker.inference.merge import save_merged_model

        adapter_id = self._lookup(adapter_ref)
        ref = self.ref_for(adapter_id) if adapter_id else None
        if ref is None:
            raise RuntimeError(f"merged adapter '{adapter_ref}' is not in the registry")
        merged = self.settings.data_dir / "merged" / ref.id
        if not (merged / "config.json").is_file():
            save_merged_model(base_path, self.fetch(ref), merged)
        self.merged_adapter_id = ref.id
        log.info("serving adapter %s merged into %s", ref.id, self.base_model_id)
        return merged

    def fetch(self, ref: AdapterRef) -> Path:
        """The adapter's folder in the local cache, copied from storage and checked against its sha256."""
        return fetch_adapter(ref, self.cache_dir, self.settings.storage_cache_bytes)  # loaded ones live in memory

    def ensure(self, ref: AdapterRef, pinned: bool = False) -> str | None:
        """Make the adapter resident (idempotent); returns its engine name (None: merged into the base)."""
        if self.merged_adapter_id is not None:
            if ref.id != self.merged_adapter_id:
                raise AdapterFetchError(f"this deployment serves only adapter {self.merged_adapter_id} (merged)")
            return None
        if ref.base_model != self.base_model_id:
            raise AdapterFetchError(f"adapter {ref.id} is for base '{ref.base_model}', but this server serves "
                                    f"'{self.base_model_id}'")
        self.engine.adapters.ensure(ref.id, lambda: self.fetch(ref), pinned=pinned)
        return ref.id

    def unload(self, adapter_id: str) -> bool:
        """Unpin and drop an adapter (idempotent). False when requests still use it: it stays,
        unpinned, and is evicted once idle."""
        from worker.inference.adapters import AdapterInUseError

        if self.engine.adapters.status(adapter_id) is None:
            return True
        self.engine.adapters.set_pinned(adapter_id, False)
        try:
            self.engine.adapters.unload(adapter_id)
        except AdapterInUseError:
            return False
        return True

    def resident_ids(self) -> set[str]:
        """The adapter versions resident in the engine now."""
        return set(self.engine.adapters.states())

    def ref_for(self, adapter_id: str) -> AdapterRef | None:
        """An adapter's reference from the registry, if it is still live."""
        with session_scope() as session:
            row = session.get(Adapter, adapter_id)
            if row is None or row.status != "ready":
                return None
            return AdapterRef.of(row)

    @staticmethod
    def _lookup(ref_text: str) -> str | None:
        """An adapter id from an id or a fine-tuned model name (both unique across teams)."""
        from sqlalchemy import or_, select

        with session_scope() as session:
            return session.scalar(select(Adapter.id).where(
                or_(Adapter.id == ref_text, Adapter.fine_tuned_model == ref_text), Adapter.status == "ready"))

    def preload_pinned(self) -> None:
        """Load the adapters named in settings.pinned_adapters (ids or fine-tuned model names)."""
        for ref_text in filter(None, (r.strip() for r in self.settings.pinned_adapters.split(","))):
            adapter_id = self._lookup(ref_text)
            ref = self.ref_for(adapter_id) if adapter_id else None
            if ref is None:
                log.error("pinned adapter %s is not in the registry", ref_text)
                continue
            from worker.inference.adapters import AdapterPinLimitError

            try:
                self.ensure(ref, pinned=True)
            except AdapterPinLimitError as exc:
                log.error("%s; %s stays unpinned", exc, ref_text)
                self.ensure(ref)
