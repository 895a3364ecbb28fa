"""Fine-tuning job shapes, in OpenAI's form plus our `peft` extension object."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.models import Checkpoint, Job, JobEvent
from core.schemas.peft_methods import RANKED_METHODS
from core.schemas.training import Hyperparameters, PeftConfigSpec


class SupervisedMethod(BaseModel):
    """`method.supervised`."""

    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class MethodSpec(BaseModel):
    """`method`: only supervised fine-tuning for now."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"]
    supervised: SupervisedMethod | None = None


class JobCreate(BaseModel):
    """The body of `POST /v1/fine_tuning/jobs`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: MethodSpec | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None
    peft: PeftConfigSpec = Field(default_factory=PeftConfigSpec)

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError("metadata holds at most 16 pairs")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 characters and values at most 512")
        return value

    @model_validator(mode="after")
    def _one_hyperparameter_source(self) -> "JobCreate":
        if self.hyperparameters is not None and self.method and self.method.supervised:
            raise ValueError("give hyperparameters either at the top level or in method.supervised, not both")
        return self

    def chosen_hyperparameters(self) -> Hyperparameters:
        """The hyperparameters from whichever form the client used."""
        if self.method and self.method.supervised:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


class JobError(BaseModel):
    """Why a job failed."""

    code: str
    message: str
    param: str | None = None


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

    @classmethod
    def of(cls, row: Job) -> "JobPublic":
        """Render a Job row."""
        resolved = row.resolved or {}
        hyper = {
            "n_epochs": resolved.get("n_epochs", "auto"),
            "batch_size": resolved.get("batch_size", "auto"),
            "learning_rate_multiplier": resolved.get("learning_rate_multiplier", "auto"),
        }
        peft = dict(resolved.get("peft") or row.spec.get("peft") or {})
        if resolved:
            peft.update(quantization=resolved["quantization"], learning_rate=resolved["learning_rate"])
            if peft.get("method") in RANKED_METHODS:
                peft["alpha"] = resolved["lora_alpha"]
        return cls(
            id=row.id,
            model=row.model,
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
            method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
            peft=peft,
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
