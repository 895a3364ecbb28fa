"""Model objects for `/v1/models`, in OpenAI's shape with vLLM's `parent`/`root`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelPublic(BaseModel):
    """A servable model: a base model or a fine-tuned adapter."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None
    root: str | None = None
