"""Fine-tuning job shapes, in OpenAI's form plus our `peft` extension object."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from core.models import Checkpoint, Job, JobEvent
from core.schemas.bounds import ObjectId
from core.schemas.common import FieldProblems
from core.schemas.peft_methods import RANKED_METHODS
from core.schemas.training import (
    DpoHyperparameters,
    Hyperparameters,
    PeftConfigSpec,
    ResolvedTraining,
    TrainingMethod,
)

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_INTEGRATIONS = 8
MAX_INTEGRATIONS_BYTES = 8192
_BAD_KEY_CHARACTERS = re.compile(r'["\\\x00-\x1f\x7f]')


def valid_metadata_key(key: str) -> bool:
    """Keys are 1-64 characters without quotes, backslashes or control characters (they become JSON paths)."""
    return 0 < len(key) <= MAX_METADATA_KEY and not _BAD_KEY_CHARACTERS.search(key)


class SupervisedMethod(BaseModel):
    """`method.supervised`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class DpoMethod(BaseModel):
    """`method.dpo`: Direct Preference Optimization on a preference file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class MethodSpec(BaseModel):
    """`method`, in OpenAI's shape: `supervised` fine-tuning or `dpo` (preference) tuning."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None

    @model_validator(mode="after")
    def _object_of_its_type(self) -> "MethodSpec":
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise FieldProblems([(other, f"applies only to method type '{other}', not '{self.type}'")])
        return self


class JobCreate(BaseModel):
    """The body of `POST /v1/fine_tuning/jobs`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256,
                       description="a base model id, or one of the team's fine-tuned models to continue from "
                                   "(ft:... name, adapter id, name, name@version or name:alias), as inference takes")
    training_file: ObjectId
    validation_file: ObjectId | None = None
    hyperparameters: Hyperparameters | None = None
    method: MethodSpec | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, Annotated[str, StringConstraints(max_length=MAX_METADATA_VALUE)]] | None = Field(
        None, max_length=MAX_METADATA_PAIRS,
        description=f"at most {MAX_METADATA_PAIRS} pairs; keys 1-{MAX_METADATA_KEY} characters without quotes, "
                    f"backslashes or control characters; values at most {MAX_METADATA_VALUE} characters")
    integrations: list[dict[str, Any]] | None = Field(
        None, max_length=MAX_INTEGRATIONS,
        description=f"accepted for compatibility and stored; at most {MAX_INTEGRATIONS} entries, "
                    f"{MAX_INTEGRATIONS_BYTES} bytes of JSON in all")
    peft: PeftConfigSpec = Field(default_factory=PeftConfigSpec)

    @field_validator("metadata")
    @classmethod
    def _metadata_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key in value or {}:
            if not valid_metadata_key(key):
                raise ValueError(f"metadata key {key[:80]!r} must be 1-{MAX_METADATA_KEY} characters without "
                                 "quotes, backslashes or control characters")
        return value

    @field_validator("integrations")
    @classmethod
    def _integrations_size(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value is not None and len(json.dumps(value)) > MAX_INTEGRATIONS_BYTES:
            raise ValueError(f"integrations take at most {MAX_INTEGRATIONS_BYTES} bytes of JSON")
        return value

    @model_validator(mode="after")
    def _one_hyperparameter_source(self) -> "JobCreate":
        if self.hyperparameters is not None and self.method and self.method.type == "dpo":
            raise FieldProblems([("hyperparameters", "a dpo job takes its hyperparameters in "
                                  "method.dpo.hyperparameters")])
        if self.hyperparameters is not None and self.method and self.method.supervised:
            raise ValueError("give hyperparameters either at the top level or in method.supervised, not both")
        return self

    @property
    def method_type(self) -> TrainingMethod:
        """`supervised` (also when `method` is left out) or `dpo`."""
        return self.method.type if self.method else "supervised"

    def chosen_hyperparameters(self) -> Hyperparameters:
        """The hyperparameters from whichever form the client used."""
        if self.method and self.method.dpo:
            return self.method.dpo.hyperparameters
        if self.method and self.method.type == "dpo":
            return DpoHyperparameters()
        if self.method and self.method.supervised:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


class JobError(BaseModel):
    """Why a job failed."""

    code: str
    message: str
    param: str | None = None


def public_training(resolved: dict, spec_peft: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """A job's hyperparameters and `peft` object as clients see them: resolved where the job resolved them."""
    hyper = {
        "n_epochs": resolved.get("n_epochs", "auto"),
        "batch_size": resolved.get("batch_size", "auto"),
        "learning_rate_multiplier": resolved.get("learning_rate_multiplier", "auto"),
    }
    peft = dict(resolved.get("peft") or spec_peft)
    if resolved:
        peft.update(quantization=resolved["quantization"], learning_rate=resolved["learning_rate"])
        if peft.get("method") in RANKED_METHODS:
            peft["alpha"] = resolved["lora_alpha"]
    return hyper, peft


def public_method(resolved: dict, spec: dict, hyper: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `method` object of a job: its type and its (resolved) hyperparameters."""
    kind = resolved.get("method") or (spec.get("method") or {}).get("type") or "supervised"
    if kind == "dpo":
        spec_beta = (((spec.get("method") or {}).get("dpo") or {}).get("hyperparameters") or {}).get("beta", "auto")
        hyper = {**hyper, "beta": resolved.get("beta") or spec_beta}
    return {"type": kind, kind: {"hyperparameters": hyper}}


def public_start_adapter(resolved: dict) -> dict[str, Any] | None:
    """The adapter a job continues from, as clients see it (no storage key), or None."""
    start = resolved.get("start_adapter")
    return {k: start[k] for k in ("id", "fine_tuned_model", "name", "version", "method")} if start else None


class JobPreview(BaseModel):
    """`POST /v1/fine_tuning/jobs?dry_run=true`: what the job would train with, without creating it."""

    object: Literal["fine_tuning.job.preview"] = "fine_tuning.job.preview"
    model: str
    training_file: str
    validation_file: str | None
    training_examples: int
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    peft: dict[str, Any]
    expected_steps: int | None
    start_adapter: dict[str, Any] | None = Field(None, description="the adapter the job would continue from")

    @classmethod
    def of(cls, body: "JobCreate", resolved: ResolvedTraining, n_examples: int) -> "JobPreview":
        """The preview of a validated request and its resolution."""
        shown = resolved.model_dump(mode="json")
        hyper, peft = public_training(shown, {})
        return cls(model=body.model, training_file=body.training_file, validation_file=body.validation_file,
                   training_examples=n_examples, hyperparameters=hyper,
                   method=public_method(shown, {}, hyper), peft=peft,
                   expected_steps=resolved.expected_steps, start_adapter=public_start_adapter(shown))


class JobPublic(BaseModel):
    """A fine-tuning job as clients see it."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str]
    status: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    trained_tokens: int | None
    error: JobError | None
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    estimated_finish: int | None
    integrations: list[Any] = []
    method: dict[str, Any]
    peft: dict[str, Any]
    start_adapter: dict[str, Any] | None = Field(
        None, description="the fine-tuned model the job continues from, when its `model` named one")

    @classmethod
    def of(cls, row: Job) -> "JobPublic":
        """Render a Job row; `model` is what the client sent (the row keeps the base model id)."""
        hyper, peft = public_training(row.resolved or {}, row.spec.get("peft") or {})
        return cls(
            id=row.id,
            model=row.spec.get("model") or row.model,
            created_at=int(row.created_at),
            finished_at=int(row.finished_at) if row.finished_at else None,
            fine_tuned_model=row.fine_tuned_model,
            organization_id=row.team_id,
            result_files=row.result_files or [],
            status=row.status,
            training_file=row.training_file,
            validation_file=row.validation_file,
            hyperparameters=hyper,
            trained_tokens=row.trained_tokens,
            error=JobError(**row.error) if row.error else None,
            seed=row.seed,
            suffix=row.suffix,
            metadata=row.user_metadata,
            estimated_finish=int(row.estimated_finish) if row.estimated_finish else None,
            method=public_method(row.resolved or {}, row.spec, hyper),
            peft=peft,
            start_adapter=public_start_adapter(row.resolved or {}),
        )


class JobListPage(BaseModel):
    """A page of jobs, with OpenAI's first/last ids."""

    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class JobEventPublic(BaseModel):
    """One job event."""

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] = {}

    @classmethod
    def of(cls, row: JobEvent) -> "JobEventPublic":
        """Render a JobEvent row."""
        return cls(
            id=row.id,
            created_at=int(row.created_at),
            level=row.level,
            message=row.message,
            type=row.type,
            data=row.data or {},
        )


class CheckpointPublic(BaseModel):
    """A training checkpoint."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, Any]
    fine_tuning_job_id: str

    @classmethod
    def of(cls, row: Checkpoint, fine_tuned_model: str) -> "CheckpointPublic":
        """Render a Checkpoint row."""
        return cls(
            id=row.id,
            created_at=int(row.created_at),
            fine_tuned_model_checkpoint=f"{fine_tuned_model}:ckpt-step-{row.step}",
            step_number=row.step,
            metrics=row.metrics or {},
            fine_tuning_job_id=row.job_id,
        )
