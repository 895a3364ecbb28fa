"""The inference server's routes: OpenAI-compatible chat and text completions, the replica's status and
probes, and the internal adapter admin."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from core.errors import ApiError, invalid, unavailable
from core.schemas.inference import (
    AdapterRef,
    ChatCompletionCreate,
    CompletionCreate,
    InternalLoadAdapter,
    InternalUnloadAdapter,
    SamplingFields,
)
from core.schemas.replicas import ReplicaStatus
from core.sse import event_stream
from worker.inference.adapter_cache import AdapterFetchError
from worker.inference.generation import GenerationHandle, GenerationRequest
from worker.inference.metrics import ServingMetrics
from worker.inference.replica import LOADING_RETRY_AFTER_SECONDS, Replica
from worker.inference.responses import CompletionShaper, collect, stream_chunks, usage
from worker.inference.service import InferenceService

DEFAULT_CHAT_TOKENS = 512
router = APIRouter()


def get_replica(request: Request) -> Replica:
    """The app's replica (started by the lifespan)."""
    return request.app.state.replica


def get_service(replica: Annotated[Replica, Depends(get_replica)]) -> InferenceService:
    """The replica's inference service; 503 with Retry-After while the base model loads."""
    return replica.require_service()


ReplicaDep = Annotated[Replica, Depends(get_replica)]
ServiceDep = Annotated[InferenceService, Depends(get_service)]
AdapterHeader = Annotated[str | None, Header(description="The adapter version the API resolved the model to")]


class AdapterLoadFailed(Exception):
    """The engine could not load an adapter; `param` names the request field that chose it."""

    def __init__(self, adapter_id: str, cause: Exception, param: str) -> None:
        super().__init__(f"adapter {adapter_id} could not be loaded: {cause}")
        self.param = param


async def make_resident(service: InferenceService, ref: AdapterRef, *, param: str, pinned: bool = False,
                        reported: tuple[type[Exception], ...] = ()) -> str | None:
    """Load `ref` unless it is resident; returns its engine name (None: merged into the base).

    The errors in `reported` leave as they are, for the app's handlers to answer; any other is a load
    failure (the engine's load errors carry a readable message).
    """
    from worker.inference.adapters import AdapterCapacityError, AdapterPinLimitError

    try:
        return await asyncio.to_thread(service.ensure, ref, pinned)
    except reported:
        raise
    except AdapterCapacityError as exc:
        if isinstance(exc, AdapterPinLimitError):
            raise AdapterLoadFailed(ref.id, exc, param) from exc
        raise unavailable(str(exc), "adapter_slots_busy") from exc
    except Exception as exc:
        raise AdapterLoadFailed(ref.id, exc, param) from exc


@router.get("/healthz")
def healthz() -> dict:
    """Liveness: the process answers (its base model may still be loading)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "The base model is still loading; see Retry-After."}})
def readyz(replica: ReplicaDep) -> JSONResponse:
    """Readiness: 200 once the base model is loaded and the fleet has been told so."""
    if replica.ready.is_set():
        return JSONResponse({"status": "ready", "base_model": replica.base_model_id})
    body = {"status": "failed" if replica.error else "loading", "base_model": replica.base_model_id,
            "error": replica.error}
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(LOADING_RETRY_AFTER_SECONDS)})


@router.get("/status", response_model=ReplicaStatus)
def status(replica: ReplicaDep) -> ReplicaStatus:
    """What this replica serves, its capacity, what is resident, how busy it is and its counters."""
    return replica.status()


@router.get("/internal/status")
def internal_status(replica: ReplicaDep) -> dict:
    """`/status`, plus every adapter's state in the engine."""
    service = replica.service
    return {**replica.status().model_dump(), "adapters": service.engine.adapters.states() if service else {}}


@router.post("/internal/adapters/load")
async def load(body: InternalLoadAdapter, service: ServiceDep) -> dict:
    """Load (and pin) one adapter version; idempotent."""
    from worker.inference.adapters import AdapterPinLimitError

    await make_resident(service, body.adapter, param="lora_path", pinned=body.pinned,
                        reported=(AdapterPinLimitError,))
    return {"adapter_id": body.adapter.id, "state": service.engine.adapters.states().get(body.adapter.id)}


@router.post("/internal/adapters/unload")
async def unload(body: InternalUnloadAdapter, service: ServiceDep) -> dict:
    """Unpin and unload one adapter version; idempotent."""
    gone = await asyncio.to_thread(service.unload, body.adapter_id)
    return {"adapter_id": body.adapter_id, "state": "unloaded" if gone else "unpinned; in use"}


@router.post("/v1/chat/completions", response_model=None)
async def chat(body: ChatCompletionCreate, replica: ReplicaDep, x_patchbay_adapter: AdapterHeader = None) -> Response:
    """Chat completion through the base model's chat template."""
    service, adapter = await _receive(replica, x_patchbay_adapter, body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    prompt_ids = service.engine.encode_chat(messages)
    return await _generate(service, body, prompt_ids, adapter, chat=True, limit=body.token_limit(DEFAULT_CHAT_TOKENS),
                           logprobs=body.logprobs)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionCreate, replica: ReplicaDep,
                      x_patchbay_adapter: AdapterHeader = None) -> Response:
    """Text completion of a raw prompt."""
    service, adapter = await _receive(replica, x_patchbay_adapter, body.model)
    prompt_ids = service.engine.encode_text(body.prompt_text())
    return await _generate(service, body, prompt_ids, adapter, chat=False, limit=body.token_limit(),
                           logprobs=body.logprobs is not None)


async def _receive(replica: Replica, header: str | None, model: str) -> tuple[InferenceService, str | None]:
    """Count a generation request (by its adapter version, else the model it names); return the service
    (503 while the base loads) and the engine name of the request's adapter (None: the base)."""
    ref = AdapterRef.model_validate_json(header) if header else None
    replica.requests.count(ref.id if ref is not None else model)
    ServingMetrics(replica.base_model_id).request(ref.id if ref is not None else None)
    service = replica.require_service()
    return service, await _resolve_adapter(service, ref, model)


async def _resolve_adapter(service: InferenceService, ref: AdapterRef | None, model: str) -> str | None:
    """The engine name of the request's adapter (from the API's header), or None for the base model."""
    if ref is not None:
        return await make_resident(service, ref, param="model", reported=(AdapterFetchError,))
    if model != service.base_model_id:
        raise ApiError(404, f"The model '{model}' is not served here (base: '{service.base_model_id}').",
                       param="model", code="model_not_found")
    return None


async def _generate(service: InferenceService, body: SamplingFields, prompt_ids: list[int], adapter: str | None, *,
                    chat: bool, limit: int, logprobs: bool) -> Response:
    """Run `body.n` generations of the prompt; the whole answer, or its chunks as they come."""
    context = service.engine.max_context(adapter)
    if not prompt_ids:
        raise invalid("The prompt is empty.", "messages" if chat else "prompt")
    if len(prompt_ids) + limit > context:
        if len(prompt_ids) >= context:
            raise invalid(f"The prompt has {len(prompt_ids)} tokens; this model's context is {context}.",
                          "messages" if chat else "prompt", "context_length_exceeded")
        limit = context - len(prompt_ids)
    requests = [GenerationRequest(
        prompt_ids=prompt_ids, adapter=adapter, max_new_tokens=limit, temperature=body.temperature,
        top_p=body.top_p, seed=None if body.seed is None else body.seed + i, stop=body.stop_list(),
        logprobs=logprobs) for i in range(body.n)]
    handles = [await _submit(service, request) for request in requests]
    shaper = CompletionShaper(body.model, chat)
    if body.stream:
        return event_stream(stream_chunks(handles, shaper, body.include_usage(), len(prompt_ids)))
    results = await asyncio.gather(*(collect(h) for h in handles))
    completion_tokens = sum(r[3] for r in results)
    return JSONResponse(shaper.response([(t, f, lp) for t, f, lp, _ in results],
                                        usage(len(prompt_ids), completion_tokens)))


async def _submit(service: InferenceService, generation: GenerationRequest) -> GenerationHandle:
    """Queue one generation; reload its adapter if it was evicted since it was made resident."""
    from worker.inference.adapters import AdapterNotReadyError

    for attempt in range(3):
        try:
            return service.engine.submit(generation)
        except AdapterNotReadyError:
            if attempt == 2 or generation.adapter is None:
                raise ApiError(503, "the adapter could not stay resident; retry", code="adapter_busy") from None
            ref = await asyncio.to_thread(service.ref_for, generation.adapter)
            if ref is None:
                raise ApiError(404, "the adapter was deleted", param="model", code="model_not_found") from None
            await asyncio.to_thread(service.ensure, ref)
        except ValueError as exc:
            raise invalid(str(exc), None, "invalid_generation_request") from None
