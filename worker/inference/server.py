"""The inference server: the app, the replica it serves for its lifetime, and the answers to adapter errors.

The routes (OpenAI-compatible chat and text completions, status and probes, and the internal adapter
admin) are in `worker.inference.routes`; they reach the one `Replica` (and, once the base model is
loaded, its `InferenceService`) through `ReplicaDep` and `ServiceDep`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from core.errors import error_response, install_error_handlers
from core.settings import get_settings
from worker.inference.adapter_cache import answer_fetch_errors
from worker.inference.metrics import install_metrics
from worker.inference.replica import Replica
from worker.inference.routes import AdapterLoadFailed, router


def replica_lifespan(exit_on_failure: bool) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A lifespan that starts the replica (it announces itself, then loads the base in the background)
    and stops it at shutdown; startup never waits for the base model."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        replica = Replica(get_settings(), exit_on_failure=exit_on_failure)
        app.state.replica = replica
        replica.start()
        try:
            yield
        finally:
            replica.stop()

    return lifespan


def create_inference_app(*, exit_on_failure: bool = False) -> FastAPI:
    """Build the inference app; it serves at once, and its base model loads in the background."""
    app = FastAPI(title="Patchbay inference", lifespan=replica_lifespan(exit_on_failure))
    install_error_handlers(app)
    install_adapter_error_handlers(app)
    app.include_router(router)
    install_metrics(app)
    return app


def create_inference_process_app() -> FastAPI:
    """The app `patchbay inference` runs: a base model that cannot be loaded ends the process (exit 1)."""
    return create_inference_app(exit_on_failure=True)


def install_adapter_error_handlers(app: FastAPI) -> None:
    """Answer the adapter errors the routes let through: fetch failures, load failures and the pin limit."""
    from worker.inference.adapters import AdapterPinLimitError

    async def load_failed(_: Request, exc: AdapterLoadFailed) -> JSONResponse:
        return error_response(400, str(exc), exc.param, "adapter_load_failed")

    async def pin_limit(_: Request, exc: AdapterPinLimitError) -> JSONResponse:
        return error_response(409, str(exc), "lora_name", "pin_limit")

    answer_fetch_errors(app)
    app.add_exception_handler(AdapterLoadFailed, load_failed)
    app.add_exception_handler(AdapterPinLimitError, pin_limit)
