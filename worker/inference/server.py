"""The inference server: OpenAI-compatible chat and text completions over the batching engine."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from core.errors import ApiError, install_error_handlers, invalid
from core.schemas.inference import AdapterRef, ChatCompletionCreate, CompletionCreate, SamplingFields
from core.settings import get_settings
from worker.inference.responses import CompletionShaper, usage
from worker.inference.service import AdapterFetchError, InferenceService

log = logging.getLogger("patchbay.inference")
DEFAULT_CHAT_TOKENS = 512


def create_inference_app() -> FastAPI:
    """Build the inference app; the base model loads at startup."""
    settings = get_settings()
    state: dict = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        from worker.inference.registry_sync import RegistrySync

        service = await asyncio.to_thread(InferenceService, settings)
        state["service"] = service
        await asyncio.to_thread(service.preload_pinned)
        sync = RegistrySync(service, settings)
        sync.start()
        yield
        sync.stop()
        service.engine.close()

    app = FastAPI(title="Patchbay inference", lifespan=lifespan)
    install_error_handlers(app)

    def service() -> InferenceService:
        return state["service"]

    async def resolve_adapter(header: str | None, model: str) -> str | None:
        if header:
            ref = AdapterRef.model_validate_json(header)
            try:
                return await asyncio.to_thread(service().ensure, ref)
            except AdapterFetchError as exc:
                raise invalid(str(exc), "model", "adapter_unavailable") from None
            except Exception as exc:  # the engine's load errors carry a readable message
                raise invalid(f"adapter {ref.id} could not be loaded: {exc}", "model", "adapter_load_failed") from None
        if model != service().base_model_id:
            raise ApiError(404, f"The model '{model}' is not served here (base: '{service().base_model_id}').",
                           param="model", code="model_not_found")
        return None

    @app.get("/healthz")
    def healthz() -> dict:
        """Liveness."""
        return {"status": "ok"}

    @app.get("/internal/status")
    def status() -> dict:
        """Base model, adapter states and batching statistics."""
        return {"base_model": service().base_model_id, "adapters": service().engine.adapters.states(),
                "stats": service().engine.stats()}

    @app.post("/internal/adapters/load")
    async def load(body: dict) -> dict:
        """Load (and pin) one adapter version; idempotent."""
        ref = AdapterRef.model_validate(body["adapter"])
        from worker.inference.adapters import AdapterPinLimitError

        try:
            await asyncio.to_thread(service().ensure, ref, bool(body.get("pinned")))
        except AdapterPinLimitError as exc:
            raise ApiError(409, str(exc), param="lora_name", code="pin_limit") from None
        except Exception as exc:
            raise invalid(f"adapter {ref.id} could not be loaded: {exc}", "lora_path", "adapter_load_failed") from None
        return {"adapter_id": ref.id, "state": service().engine.adapters.states().get(ref.id)}

    @app.post("/internal/adapters/unload")
    async def unload(body: dict) -> dict:
        """Unpin and unload one adapter version; idempotent."""
        gone = await asyncio.to_thread(service().unload, body["adapter_id"])
        return {"adapter_id": body["adapter_id"], "state": "unloaded" if gone else "unpinned; in use"}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionCreate, request: Request,
                   x_patchbay_adapter: str | None = Header(None)) -> JSONResponse | StreamingResponse:
        """Chat completion through the base model's chat template."""
        adapter = await resolve_adapter(x_patchbay_adapter, body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        prompt_ids = service().engine.encode_chat(messages)
        return await _generate(request, body, prompt_ids, adapter, chat=True,
                               limit=body.token_limit(DEFAULT_CHAT_TOKENS), logprobs=body.logprobs)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionCreate, request: Request,
                          x_patchbay_adapter: str | None = Header(None)) -> JSONResponse | StreamingResponse:
        """Text completion of a raw prompt."""
        adapter = await resolve_adapter(x_patchbay_adapter, body.model)
        prompt_ids = service().engine.encode_text(body.prompt_text())
        return await _generate(request, body, prompt_ids, adapter, chat=False, limit=body.token_limit(),
                               logprobs=body.logprobs is not None)

    async def _submit(generation):
        """Queue one generation; reload its adapter if it was evicted since it was ensured."""
        from worker.inference.adapters import AdapterNotReadyError

        for attempt in range(3):
            try:
                return service().engine.submit(generation)
            except AdapterNotReadyError:
                if attempt == 2 or generation.adapter is None:
                    raise ApiError(503, "the adapter could not stay resident; retry", code="adapter_busy") from None
                ref = await asyncio.to_thread(service().ref_for, generation.adapter)
                if ref is None:
                    raise ApiError(404, "the adapter was deleted", param="model", code="model_not_found") from None
                await asyncio.to_thread(service().ensure, ref)
            except ValueError as exc:
                raise invalid(str(exc), None, "invalid_generation_request") from None

    async def _generate(request: Request, body: SamplingFields, prompt_ids: list[int], adapter: str | None, *,
                        chat: bool, limit: int, logprobs: bool) -> JSONResponse | StreamingResponse:
        from worker.inference.engine import GenerationRequest

        engine = service().engine
        context = engine.max_context(adapter)
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
        handles = [await _submit(req) for req in requests]
        shaper = CompletionShaper(body.model, chat)
        if body.stream:
            return StreamingResponse(_stream(request, handles, shaper, body.include_usage(), len(prompt_ids)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await asyncio.gather(*(_collect(h) for h in handles))
        completion_tokens = sum(r[3] for r in results)
        return JSONResponse(shaper.response([(t, f, lp) for t, f, lp, _ in results],
                                            usage(len(prompt_ids), completion_tokens)))

    return app


async def _collect(handle) -> tuple[str, str, list | None, int]:
    """Run one generation to the end: (text, finish_reason, logprobs, completion_tokens)."""
    from worker.inference.engine import ErrorEvent, FinishEvent, TokenEvent

    parts, logprobs = [], []
    async for event in handle.aiter():
        if isinstance(event, TokenEvent):
            parts.append(event.text)
            if event.logprob is not None:
                logprobs.append(_logprob_entry(event))
        elif isinstance(event, FinishEvent):
            return "".join(parts), event.finish_reason, (logprobs or None), event.completion_tokens
        elif isinstance(event, ErrorEvent):
            raise ApiError(500, f"generation failed: {event.message}", code="generation_failed")
    raise ApiError(500, "generation ended without finishing", code="generation_failed")


def _logprob_entry(event) -> dict:
    return {"token": event.text, "logprob": event.logprob, "bytes": list(event.text.encode()), "top_logprobs": []}


async def _stream(request: Request, handles: list, shaper: CompletionShaper, include_usage: bool,
                  prompt_tokens: int) -> AsyncIterator[bytes]:
    """Merge the choices' events into SSE chunks, in the order they are produced."""
    from worker.inference.engine import ErrorEvent, FinishEvent, TokenEvent

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle) -> None:
        async for event in handle.aiter():
            await queue.put((index, event))
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    open_choices, completion_tokens = len(handles), 0
    started = set()
    try:
        while open_choices:
            index, event = await queue.get()
            if event is None:
                open_choices -= 1
            elif isinstance(event, TokenEvent):
                first = index not in started
                started.add(index)
                yield shaper.chunk(index, event.text, first=first,
                                   logprobs=[_logprob_entry(event)] if event.logprob is not None else None)
            elif isinstance(event, FinishEvent):
                if index not in started:
                    started.add(index)
                    yield shaper.chunk(index, "", first=True)
                completion_tokens += event.completion_tokens
                yield shaper.chunk(index, None, finish_reason=event.finish_reason)
            elif isinstance(event, ErrorEvent):
                error = {"error": {"message": f"generation failed: {event.message}", "type": "api_error"}}
                yield f"data: {json.dumps(error)}\n\n".encode()
        if include_usage:
            yield shaper.usage_chunk(usage(prompt_tokens, completion_tokens))
        yield b"data: [DONE]\n\n"
    finally:
        for handle in handles:
            handle.cancel()
        for task in tasks:
            task.cancel()
