"""An adapter version on a replica's disk: fetched from storage once, checked against its sha256, reused.

Both engines' replicas use it (ours loads the folder into its slots, vLLM's hands the folder's path to
`/v1/load_lora_adapter`); two replicas may share one cache folder, so a copy is staged under a name of
its own and renamed into place, and a copy another process renamed first is taken as it is.
"""

from __future__ import annotations

import os
import secrets
import shutil
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


def fetch_adapter(ref: AdapterRef, cache_dir: Path) -> Path:
    """The adapter's folder under `cache_dir`, copied from storage unless a verified copy is there already."""
    target = cache_dir / ref.id
    if target.is_dir() and folder_sha256(target)[0] == ref.sha256:
        return target
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
