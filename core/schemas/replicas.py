"""What an inference replica says of itself (its heartbeat row and `GET /status`), and how the API lists it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

ReplicaEngine = Literal["patchbay", "vllm"]
ReplicaState = Literal["loading", "ready"]


class ReplicaStatus(BaseModel):
    """One replica's own account: what it serves, its capacity, what is resident and how busy it is."""

    url: str = Field(description="where the API reaches it")
    base_model: str
    engine: ReplicaEngine
    state: ReplicaState = Field(description="`loading` until its base model answers, then `ready`")
    kinds: list[str] = Field(description="adapter kinds it can serve (methods, and `sparse` for sparse deltas)")
    max_resident_adapters: int = Field(description="adapters it keeps resident at once (LRU beyond)")
    max_batch: int = Field(description="generations it runs in one batch")
    resident_adapters: list[str] = Field(default_factory=list, description="adapter version ids resident now")
    load: int = Field(0, description="generations running or queued")
    stats: dict[str, Any] = Field(default_factory=dict, description="its counters: requests, adapter loads, …")


class ReplicaPublic(ReplicaStatus):
    """A replica as `GET /v1/replicas` lists it."""

    id: str
    source: Literal["registered", "static"] = Field(
        description="`registered`: it announces itself in the database; `static`: listed in PATCHBAY_INFERENCE_URL"
    )
    started_at: float | None = None
    heartbeat_at: float | None = Field(None, description="its last heartbeat (registered) or answer (static)")


class ReplicaList(BaseModel):
    """The body of `GET /v1/replicas`."""

    object: Literal["list"] = "list"
    data: list[ReplicaPublic]
