"""Adapter registry shapes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.models import Adapter, AdapterAliasEvent
from core.registry import MAX_LINEAGE
from core.schemas.bounds import ObjectId


class AdapterParent(BaseModel):
    """The version an adapter was trained from; only `id` is sure to be known (the row may be gone)."""

    id: str
    fine_tuned_model: str | None = None
    name: str | None = None
    version: int | None = None


class AdapterPublic(BaseModel):
    """One published adapter version."""

    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    version: int
    fine_tuned_model: str | None
    base_model: str
    method: str = Field(description="the PEFT method that produced it (lora, qlora, ia3, prefix_tuning, ...)")
    techniques: dict[str, Any] = Field(
        default_factory=dict, description="techniques used in training: sparse, layer_drop, layerwise_lr_decay"
    )
    rank: int | None
    target_modules: list[str]
    trainable_params: int = Field(description="parameters the adapter trained (for sparse: changed entries too)")
    base_params: int | None = Field(description="parameters of the base model")
    trainable_share: float | None = Field(description="trainable_params / base_params")
    bytes: int = Field(description="size of the stored artifact")
    sha256: str
    metrics: dict[str, Any]
    job_id: str | None
    source: str
    status: str
    created_at: int
    aliases: list[str] = []
    parent: AdapterParent | None = Field(None, description="the version this one was trained from, if any")
    lineage: list[str] = Field(default_factory=list,
                               description=f"ids of its ancestors, nearest first (at most {MAX_LINEAGE})")

    @classmethod
    def of(cls, row: Adapter, aliases: list[str] | None = None, *, parent: Adapter | None = None,
           lineage: list[str] | None = None) -> "AdapterPublic":
        """Render an Adapter row; `parent` is the row of `row.parent_id` where it is still there."""
        shown = AdapterParent(id=row.parent_id, fine_tuned_model=getattr(parent, "fine_tuned_model", None),
                              name=getattr(parent, "name", None),
                              version=getattr(parent, "version", None)) if row.parent_id else None
        return cls(
            id=row.id, name=row.name, version=row.version, fine_tuned_model=row.fine_tuned_model,
            base_model=row.base_model, method=row.method, techniques=row.techniques or {}, rank=row.rank,
            target_modules=row.target_modules or [], trainable_params=row.trainable_params,
            base_params=row.base_params,
            trainable_share=row.trainable_params / row.base_params if row.base_params else None, bytes=row.bytes,
            sha256=row.sha256, metrics=row.metrics or {},
            job_id=row.job_id, source=row.source, status=row.status, created_at=int(row.created_at),
            aliases=sorted(aliases or []), parent=shown, lineage=lineage or [],
        )


class AliasMove(BaseModel):
    """`POST /v1/adapters/{name}/aliases`: point an alias at a version."""

    model_config = ConfigDict(extra="forbid")
    alias: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    version: int | None = Field(None, ge=1, le=2**31 - 1)
    adapter_id: ObjectId | None = None


class AliasEventPublic(BaseModel):
    """One move in an alias's history."""

    object: Literal["adapter.alias"] = "adapter.alias"
    name: str
    alias: str
    adapter_id: str | None
    previous_adapter_id: str | None
    created_at: int

    @classmethod
    def of(cls, row: AdapterAliasEvent) -> "AliasEventPublic":
        """Render an alias event."""
        return cls(name=row.name, alias=row.alias, adapter_id=row.adapter_id,
                   previous_adapter_id=row.previous_adapter_id, created_at=int(row.created_at))
