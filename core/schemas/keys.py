"""API key shapes for `/v1/api_keys`: a key is listed by its prefix only; its secret is shown once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.models import ApiKey


class ApiKeyCreate(BaseModel):
    """`POST /v1/api_keys`."""

    model_config = ConfigDict(extra="forbid")
    admin: bool = Field(False, description="the new key may manage keys, adapters at runtime and team limits")


class ApiKeyPublic(BaseModel):
    """One of the team's keys, without its secret."""

    object: Literal["api_key"] = "api_key"
    id: str
    prefix: str = Field(description="the key's first characters, to tell keys apart")
    created_at: int
    is_admin: bool

    @classmethod
    def of(cls, key: ApiKey) -> "ApiKeyPublic":
        """The public view of a key row."""
        return cls(id=key.id, prefix=key.prefix, created_at=int(key.created_at), is_admin=key.is_admin)


class ApiKeyCreated(ApiKeyPublic):
    """A new key: the only answer that carries its secret."""

    key: str = Field(description="the secret; store it now, it is never shown again")


class TeamRef(BaseModel):
    """A team, by id and name."""

    id: str
    name: str


class Identity(BaseModel):
    """`GET /v1/me`: who the calling key is."""

    object: Literal["identity"] = "identity"
    team: TeamRef
    key: ApiKeyPublic
