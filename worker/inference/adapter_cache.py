"""An adapter version on a replica's disk: fetched from storage once, checked against its sha256, reused.

Both engines' replicas use it (ours loads the folder into its slots, vLLM's hands the folder's path to
`/v1/load_lora_adapter`); two replicas may share one cache folder, so a copy is staged under a name of
its own and renamed into place, and a copy another process renamed first is taken as it is. The cache
is bounded (PATCHBAY_STORAGE_CACHE_BYTES): least recently used folders go first, never one in use.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Collection
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from core.errors import error_response
from core.schemas.inference import AdapterRef
from core.storage import folder_sha256, get_storage


class AdapterFetchError(RuntimeError):
    """An adapter that could not be fetched or failed its integrity check."""


def answer_fetch_errors(app: FastAPI) -> None:
    """Answer an `AdapterFetchError` a route lets through: 400 `adapter_unavailable`, naming `model`."""

    async def fetch_failed(_: Request, exc: AdapterFetchError) -> JSONResponse:
        return error_response(400, str(exc), "model", "adapter_unavailable")

    app.add_exception_handler(AdapterFetchError, fetch_failed)


def fetch_adapter(ref: AdapterRef, cache_dir: Path, max_bytes: int | None = None,
                  keep: Collection[str] = ()) -> Path:
    """The adapter's folder under `cache_dir`, copied from storage unless a verified copy is there already.

    With `max_bytes`, the least recently used other folders (not those named in `keep`) are removed until
    the cache fits.
    """
    target = cache_dir / ref.id
    if target.is_dir() and folder_sha256(target)[0] == ref.sha256:
        os.utime(target)
        return target
    target = _fetch(ref, cache_dir, target)
    if max_bytes is not None:
        evict_adapters(cache_dir, max_bytes, keep={*keep, ref.id})
    return target


def evict_adapters(cache_dir: Path, max_bytes: int, keep: Collection[str]) -> list[str]:
    """Remove least recently used adapter folders (by mtime) beyond `max_bytes`, sparing `keep`; their ids."""
    folders = []
    for folder in cache_dir.iterdir():
        if folder.is_dir() and ".partial-" not in folder.name:
            try:
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                folders.append((folder.stat().st_mtime, size, folder))
            except FileNotFoundError:  # another replica removed it meanwhile
                continue
    total, removed = sum(size for _, size, _ in folders), []
    for _, size, folder in sorted(folders):
        if total <= max_bytes:
            break
        if folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            removed.append(folder.name)
    return removed


def _fetch(ref: AdapterRef, cache_dir: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    storage = get_storage()
    if not storage.exists(ref.storage_key):
        raise AdapterFetchError(f"adapter {ref.id} is missing from storage")
    staging = cache_dir / f"{ref.id}.partial-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        storage.get_dir(ref.storage_key, staging)
        actual, _ = folder_sha256(staging)
        if actual != ref.sha256:
            raise AdapterFetchError(f"adapter {ref.id} failed its sha256 check (expected {ref.sha256[:12]}…, "
                                    f"got {actual[:12]}…)")
        try:
            staging.rename(target)
        except OSError:  # another replica renamed its copy into place first
            if not (target.is_dir() and folder_sha256(target)[0] == ref.sha256):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
