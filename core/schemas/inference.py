"""Chat and text completion requests, in OpenAI's shape (validated before forwarding)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.models import Adapter
from core.schemas.bounds import INT64_MAX
from core.serving_kinds import adapter_kinds

MAX_NEW_TOKENS = 4096
MAX_MESSAGES = 1024
MAX_STOP_CHARS = 256


class TextPart(BaseModel):
    """One text part of a multi-part message."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        """The message's content as plain text."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SamplingFields(BaseModel):
    """Sampling parameters shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"stop takes at most 4 non-empty strings of at most {MAX_STOP_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _penalties_unsupported(self) -> "SamplingFields":
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; leave them at 0")
        return self

    def stop_list(self) -> list[str]:
        """`stop` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool((self.stream_options or {}).get("include_usage"))


class ChatCompletionCreate(SamplingFields):
    """The body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0)

    def token_limit(self, default: int) -> int:
        """The completion length limit in force."""
        return self.max_completion_tokens or self.max_tokens or default


class CompletionCreate(SamplingFields):
    """The body of `POST /v1/completions`."""

    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=0)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send exactly one prompt per request")
        return value

    def prompt_text(self) -> str:
        """The single prompt."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_limit(self, default: int = 16) -> int:
        """The completion length limit in force (OpenAI's default is 16)."""
        return self.max_tokens or default


class AdapterRef(BaseModel):
    """What the API tells the inference server about the adapter a request resolved to."""

    id: str
    storage_key: str
    sha256: str
    base_model: str
    kinds: list[str] = Field(default_factory=lambda: ["lora"], description="see core/serving_kinds.py")

    @classmethod
    def of(cls, adapter: Adapter) -> "AdapterRef":
        """The reference of a registry row."""
        return cls(id=adapter.id, storage_key=adapter.storage_key, sha256=adapter.sha256,
                   base_model=adapter.base_model, kinds=adapter_kinds(adapter.method, adapter.techniques))


class LoadLoraAdapter(BaseModel):
    """vLLM's `POST /v1/load_lora_adapter`; `lora_path` is a registry reference (or omitted)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str | None = Field(None, max_length=512)


class UnloadLoraAdapter(BaseModel):
    """vLLM's `POST /v1/unload_lora_adapter`."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=256)


class InternalLoadAdapter(BaseModel):
    """The body of an inference server's `POST /internal/adapters/load` (sent by the API to every replica)."""

    adapter: AdapterRef
    pinned: bool = False


class InternalUnloadAdapter(BaseModel):
    """The body of an inference server's `POST /internal/adapters/unload`."""

    adapter_id: str
