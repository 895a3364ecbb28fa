"""The inference server: the app, the engine it serves for its lifetime, and the answers to adapter errors.

The routes (OpenAI-compatible chat and text completions, and the internal adapter admin) are in
`worker.inference.routes`; they reach the one `InferenceService` through `ServiceDep`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from core.errors import error_response, install_error_handlers
from core.settings import get_settings
from worker.inference.routes import AdapterLoadFailed, router
from worker.inference.service import AdapterFetchError, InferenceService


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the base model and the pinned adapters, and follow the registry, while the app runs."""
    from worker.inference.registry_sync import RegistrySync

    settings = get_settings()
    service = await asyncio.to_thread(InferenceService, settings)
    app.state.service = service
    await asyncio.to_thread(service.preload_pinned)
    sync = RegistrySync(service, settings)
    sync.start()
    try:
        yield
    finally:
        sync.stop()
        service.engine.close()


def create_inference_app() -> FastAPI:
    """Build the inference app; the base model loads at startup."""
    app = FastAPI(title="Patchbay inference", lifespan=lifespan)
    install_error_handlers(app)
    install_adapter_error_handlers(app)
    app.include_router(router)
    return app


def install_adapter_error_handlers(app: FastAPI) -> None:
    """Answer the adapter errors the routes let through: fetch failures, load failures and the pin limit."""
    from worker.inference.adapters import AdapterPinLimitError

    async def fetch_failed(_: Request, exc: AdapterFetchError) -> JSONResponse:
        return error_response(400, str(exc), "model", "adapter_unavailable")

    async def load_failed(_: Request, exc: AdapterLoadFailed) -> JSONResponse:
        return error_response(400, str(exc), exc.param, "adapter_load_failed")

    async def pin_limit(_: Request, exc: AdapterPinLimitError) -> JSONResponse:
        return error_response(409, str(exc), "lora_name", "pin_limit")

    app.add_exception_handler(AdapterFetchError, fetch_failed)
    app.add_exception_handler(AdapterLoadFailed, load_failed)
    app.add_exception_handler(AdapterPinLimitError, pin_limit)
