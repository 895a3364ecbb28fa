"""OpenAI-compatible inference, forwarded to the inference servers after auth, limits and name resolution.

These routes hold no database connection while a generation runs: the name is resolved in a short
session of its own, then the request is forwarded to a replica of its base model (api/fleet.py).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.adapter_broadcast import load_everywhere, unload_everywhere
from api.deps import AdminTeam, CurrentTeam, KeyRateLimited, RateLimitsDep, SettingsDep
from api.forwarding import UsageHook, forward
from api.openapi import error_responses
from core.db import session_scope
from core.errors import ApiError, invalid
from core.models import Team
from core.quotas import limits_for
from core.registry import ResolutionError, find_team_adapter, resolve_model
from core.schemas.inference import (
    AdapterRef,
    ChatCompletionCreate,
    CompletionCreate,
    LoadLoraAdapter,
    UnloadLoraAdapter,
)

router = APIRouter(prefix="/v1", tags=["inference"])


def _adapter_for(team_id: str, model: str) -> tuple[str, AdapterRef | None]:
    """The base model a request's `model` runs on, and its adapter version (None for the base itself)."""
    with session_scope() as session:
        try:
            resolution = resolve_model(session, team_id, model)
        except ResolutionError as exc:
            raise ApiError(404, str(exc), param="model", code="model_not_found") from None
        return resolution.base_model, AdapterRef.of(resolution.adapter) if resolution.adapter else None


async def _within_limits(team: Team, limits: RateLimitsDep, settings: SettingsDep) -> UsageHook | None:
    """Count the request against the team's requests per minute, refuse it when its tokens are spent, and
    return the hook that counts what it generates (None when tokens are unlimited)."""
    team_limits = limits_for(team, settings)
    who = f"team '{team.name}'"
    await limits.hit("team-requests", team.id, team_limits.requests_per_minute, who, team=team.name)
    await limits.check_tokens(team.id, team_limits.tokens_per_minute, who, team=team.name)
    if not team_limits.tokens_per_minute:
        return None
    return lambda tokens: limits.add_tokens(team.id, team_limits.tokens_per_minute, tokens)


async def _generate(path: str, body: ChatCompletionCreate | CompletionCreate, team: Team, limits: RateLimitsDep,
                    settings: SettingsDep) -> Response:
    on_usage = await _within_limits(team, limits, settings)
    base_model, adapter = await run_in_threadpool(_adapter_for, team.id, body.model)
    return await forward(path, body.model_dump(mode="json", exclude_none=True), base_model, adapter, body.stream,
                         on_usage)


@router.post("/chat/completions", responses=error_responses(404, 502, 503))
async def chat_completions(body: ChatCompletionCreate, team: CurrentTeam, limits: RateLimitsDep,
                           settings: SettingsDep) -> Response:
    """Chat completion with the base model or any of the team's adapters."""
    return await _generate("/v1/chat/completions", body, team, limits, settings)


@router.post("/completions", responses=error_responses(404, 502, 503))
async def completions(body: CompletionCreate, team: CurrentTeam, limits: RateLimitsDep,
                      settings: SettingsDep) -> Response:
    """Text completion with the base model or any of the team's adapters."""
    return await _generate("/v1/completions", body, team, limits, settings)


def _team_adapter_ref(team_id: str, ref: str, param: str) -> AdapterRef:
    with session_scope() as session:
        adapter = find_team_adapter(session, team_id, ref)
        if adapter is None:
            raise ApiError(404, f"No adapter found for '{ref}'.", param=param, code="not_found")
        return AdapterRef.of(adapter)


@router.post("/load_lora_adapter", dependencies=[KeyRateLimited], responses=error_responses(403, 404, 503))
async def load_lora_adapter(body: LoadLoraAdapter, team: AdminTeam) -> dict:
    """Load and pin an adapter on every replica of its base that serves its kind (idempotent).

    `lora_path` names a registry entry.
    """
    ref = body.lora_path or body.lora_name
    if ref.startswith(("/", ".", "~")):
        raise invalid("lora_path must name a registry adapter (import local folders with POST /v1/adapters/import).",
                      "lora_path")
    adapter = await run_in_threadpool(_team_adapter_ref, team.id, ref, "lora_path")
    answers = await load_everywhere(adapter, pinned=True)
    return {"object": "lora_adapter", "lora_name": body.lora_name, "adapter_id": adapter.id, "replicas": answers}


@router.post("/unload_lora_adapter", dependencies=[KeyRateLimited], responses=error_responses(403, 404))
async def unload_lora_adapter(body: UnloadLoraAdapter, team: AdminTeam) -> dict:
    """Unpin and unload an adapter on every replica of its base (idempotent)."""
    adapter = await run_in_threadpool(_team_adapter_ref, team.id, body.lora_name, "lora_name")
    answers = await unload_everywhere(adapter)
    return {"object": "lora_adapter", "lora_name": body.lora_name, "adapter_id": adapter.id, "replicas": answers}
