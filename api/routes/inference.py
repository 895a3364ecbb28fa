"""OpenAI-compatible inference, forwarded to the inference servers after auth and name resolution."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from api.deps import AdminTeam, CurrentTeam, SessionDep
from api.forwarding import adapter_headers, broadcast, forward
from core.errors import ApiError, invalid
from core.registry import ResolutionError, find_team_adapter, resolve_model
from core.schemas.inference import (
    AdapterRef,
    ChatCompletionCreate,
    CompletionCreate,
    LoadLoraAdapter,
    UnloadLoraAdapter,
)

router = APIRouter(prefix="/v1", tags=["inference"])


def _adapter_for(session, team, model: str) -> AdapterRef | None:
    try:
        resolution = resolve_model(session, team.id, model)
    except ResolutionError as exc:
        raise ApiError(404, str(exc), param="model", code="model_not_found") from None
    return AdapterRef.of(resolution.adapter) if resolution.adapter else None


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionCreate, session: SessionDep, team: CurrentTeam) -> Response:
    """Chat completion with the base model or any of the team's adapters."""
    adapter = _adapter_for(session, team, body.model)
    session.close()  # release the connection while generation runs
    return await forward("/v1/chat/completions", body.model_dump(mode="json", exclude_none=True),
                         adapter_headers(adapter), body.stream)


@router.post("/completions")
async def completions(body: CompletionCreate, session: SessionDep, team: CurrentTeam) -> Response:
    """Text completion with the base model or any of the team's adapters."""
    adapter = _adapter_for(session, team, body.model)
    session.close()
    return await forward("/v1/completions", body.model_dump(mode="json", exclude_none=True),
                         adapter_headers(adapter), body.stream)


@router.post("/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapter, session: SessionDep, team: AdminTeam) -> dict:
    """Load and pin an adapter on every replica (idempotent). `lora_path` names a registry entry."""
    ref = body.lora_path or body.lora_name
    if ref.startswith(("/", ".", "~")):
        raise invalid("lora_path must name a registry adapter (import local folders with POST /v1/adapters/import).",
                      "lora_path")
    adapter = find_team_adapter(session, team.id, ref)
    if adapter is None:
        raise ApiError(404, f"No adapter found for '{ref}'.", param="lora_path", code="not_found")
    payload = {"adapter": AdapterRef.of(adapter).model_dump(), "pinned": True}
    session.close()
    answers = await broadcast("/internal/adapters/load", payload)
    return {"object": "lora_adapter", "lora_name": body.lora_name, "adapter_id": payload["adapter"]["id"],
            "replicas": answers}


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapter, session: SessionDep, team: AdminTeam) -> dict:
    """Unpin and unload an adapter on every replica (idempotent)."""
    adapter = find_team_adapter(session, team.id, body.lora_name)
    if adapter is None:
        raise ApiError(404, f"No adapter found for '{body.lora_name}'.", param="lora_name", code="not_found")
    adapter_id = adapter.id
    session.close()
    answers = await broadcast("/internal/adapters/unload", {"adapter_id": adapter_id})
    return {"object": "lora_adapter", "lora_name": body.lora_name, "adapter_id": adapter_id, "replicas": answers}
