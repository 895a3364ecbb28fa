"""The vLLM replica's HTTP server: the same face as our engine's replica, with vLLM behind it.

Probes and status (`/healthz`, `/readyz`, `/status`), the internal adapter admin the API broadcasts
(`/internal/adapters/load|unload`), and the OpenAI-compatible `/v1/chat/completions` and
`/v1/completions`: the adapter comes from the API's `X-Patchbay-Adapter` header, is made resident in
vLLM, and the request goes to vLLM under the adapter's version id (see `relay` for what passes through).

`create_vllm_app` is a uvicorn factory (`worker.inference.vllm.app:create_vllm_app`); vLLM starts in the
lifespan, in the background, so the server answers at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from core.errors import ApiError, error_response, install_error_handlers, invalid
from core.schemas.inference import AdapterRef, InternalLoadAdapter, InternalUnloadAdapter
from core.schemas.replicas import ReplicaStatus
from core.settings import get_settings
from worker.inference.adapter_cache import answer_fetch_errors
from worker.inference.metrics import ServingMetrics, install_metrics
from worker.inference.vllm.relay import error_answer, is_stream, json_answer, missing_model, read_json, stream_answer
from worker.inference.vllm.replica import LOADING_RETRY_AFTER_SECONDS, VllmReplica
from worker.inference.vllm.service import AdapterLoadFailed

router = APIRouter()


def get_replica(request: Request) -> VllmReplica:
    """The app's replica (built by the lifespan)."""
    return request.app.state.replica


ReplicaDep = Annotated[VllmReplica, Depends(get_replica)]
AdapterHeader = Annotated[str | None, Header(description="The adapter version the API resolved the model to")]


@router.get("/healthz")
def healthz() -> dict:
    """Liveness: the replica's server answers (vLLM may still be starting)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(replica: ReplicaDep) -> Response:
    """200 once vLLM answers; 503 with Retry-After while it starts (or after it failed)."""
    if replica.state == "ready":
        return JSONResponse({"status": "ready", "base_model": replica.base_model_id, "engine": "vllm"})
    body = {"status": "failed" if replica.error else "loading", "base_model": replica.base_model_id, "engine": "vllm"}
    if replica.error:
        body["error"] = replica.error
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(LOADING_RETRY_AFTER_SECONDS)})


@router.get("/status", response_model=ReplicaStatus)
def status(replica: ReplicaDep) -> ReplicaStatus:
    """What this replica serves, what is resident, how busy it is, and its counters."""
    return replica.status()


@router.post("/internal/adapters/load")
async def load(body: InternalLoadAdapter, replica: ReplicaDep) -> dict:
    """Register (and pin) one adapter version with vLLM; idempotent."""
    service = replica.require_service()
    await asyncio.to_thread(service.ensure, body.adapter, body.pinned)
    return {"adapter_id": body.adapter.id, "state": "ready"}


@router.post("/internal/adapters/unload")
async def unload(body: InternalUnloadAdapter, replica: ReplicaDep) -> dict:
    """Unpin and unregister one adapter version; idempotent."""
    service = replica.require_service()
    await asyncio.to_thread(service.unload, body.adapter_id)
    return {"adapter_id": body.adapter_id, "state": "unloaded"}


@router.post("/v1/chat/completions", response_model=None)
async def chat(request: Request, replica: ReplicaDep, x_patchbay_adapter: AdapterHeader = None) -> Response:
    """Chat completion by vLLM, with the base model or the header's adapter."""
    return await _generate(replica, "/v1/chat/completions", await _body(request), x_patchbay_adapter)


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, replica: ReplicaDep, x_patchbay_adapter: AdapterHeader = None) -> Response:
    """Text completion by vLLM, with the base model or the header's adapter."""
    return await _generate(replica, "/v1/completions", await _body(request), x_patchbay_adapter)


async def _body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise invalid("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise invalid("model: a model name is required", "model")
    return body


def _adapter_ref(header: str | None) -> AdapterRef | None:
    if not header:
        return None
    try:
        return AdapterRef.model_validate_json(header)
    except ValidationError:
        raise invalid("X-Patchbay-Adapter is not an adapter reference", None, "invalid_adapter_header") from None


async def _generate(replica: VllmReplica, path: str, body: dict, header: str | None) -> Response:
    """Forward to vLLM under the engine's model name; one retry if vLLM had dropped the adapter meanwhile."""
    service = replica.require_service()
    asked, ref = body["model"], _adapter_ref(header)
    if ref is None and asked != service.base_model_id:
        raise ApiError(404, f"The model '{asked}' is not served here (base: '{service.base_model_id}').",
                       param="model", code="model_not_found")
    if ref is not None:
        service.check(ref)
    name = ref.id if ref is not None else service.base_model_id
    ServingMetrics(replica.base_model_id).request(ref.id if ref is not None else None)
    replica.requests.begin(name)
    end = _Once(replica.requests.end)
    try:
        for attempt in range(2):
            if ref is not None:
                await asyncio.to_thread(service.hold, ref)
            release = _Once(lambda: service.release(name) if ref is not None else None)
            try:
                upstream = await replica.relay.send(path, {**body, "model": name})
                if is_stream(upstream):  # the stream's end releases the adapter and ends the request
                    release.handed = end.handed = True
                    return stream_answer(upstream, asked, _Once(release, end))
                payload = await read_json(upstream)
            finally:
                if not release.handed:
                    release()
            if ref is not None and attempt == 0 and missing_model(upstream.status_code, payload):
                if await asyncio.to_thread(service.ref_for, ref.id) is None:
                    raise ApiError(404, "the adapter was deleted", param="model", code="model_not_found")
                service.forget(ref.id)  # vLLM lost it: register it again
                continue
            return json_answer(upstream.status_code, payload, asked)
        return error_answer(upstream.status_code, payload)
    finally:
        if not end.handed:
            end()


class _Once:
    """Callbacks run at most once, however often this is called; `handed`: a stream will call it at its end."""

    def __init__(self, *callbacks: Callable[[], object]) -> None:
        self.callbacks, self.ran, self.handed = callbacks, False, False

    def __call__(self) -> None:
        if not self.ran:
            self.ran = True
            for callback in self.callbacks:
                callback()


def replica_lifespan(exit_on_failure: bool) -> Callable[[FastAPI], AsyncIterator[None]]:
    """A lifespan that starts the replica (vLLM starts in the background) and stops it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        replica = VllmReplica(get_settings(), exit_on_failure=exit_on_failure)
        app.state.replica = replica
        await replica.start()
        try:
            yield
        finally:
            await replica.stop()

    return lifespan


def create_vllm_app(*, exit_on_failure: bool = False) -> FastAPI:
    """Build the vLLM replica's app; it serves at once, and vLLM starts in the background."""
    app = FastAPI(title="Patchbay inference (vLLM)", lifespan=replica_lifespan(exit_on_failure))
    install_error_handlers(app)
    install_adapter_error_handlers(app)
    app.include_router(router)
    install_metrics(app)
    return app


def create_vllm_process_app() -> FastAPI:
    """The app `patchbay inference --engine vllm` runs: vLLM failing to start (or exiting) ends the process."""
    return create_vllm_app(exit_on_failure=True)


def install_adapter_error_handlers(app: FastAPI) -> None:
    """Answer adapter fetch failures and vLLM's refusals to load an adapter (400 both)."""

    async def load_failed(_: Request, exc: AdapterLoadFailed) -> JSONResponse:
        return error_response(400, str(exc), "model", "adapter_load_failed")

    answer_fetch_errors(app)
    app.add_exception_handler(AdapterLoadFailed, load_failed)
