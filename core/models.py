"""SQLAlchemy tables. Alembic revisions in migrations/ create them; a test checks they agree."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.ids import now


class Base(DeclarativeBase):
    """Declarative base; JSON columns map to plain dicts and lists."""

    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Team(Base):
    """A tenant. Everything a user can name belongs to exactly one team."""

    __tablename__ = "teams"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    # Per-team overrides of the settings' defaults (NULL: the default; 0: unlimited). See core/quotas.py.
    max_running_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    storage_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ApiKey(Base):
    """An API key; only its sha256 is stored."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class BaseModelRecord(Base):
    """A registered base model: an id and the local Hugging Face folder it loads from."""

    __tablename__ = "base_models"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class File(Base):
    """An uploaded dataset file."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="uploaded")
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    n_examples: Mapped[int] = mapped_column(Integer, default=0)
    storage_key: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Job(Base):
    """A fine-tuning job. This row, not the broker, is the truth about the job."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(128))
    training_file: Mapped[str] = mapped_column(String(64), index=True)
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(24), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    resolved: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    estimated_finish: Mapped[float | None] = mapped_column(Float, nullable=True)
    deadline_at: Mapped[float] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    dispatched_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobEvent(Base):
    """A line in a job's log: a message or a metrics record."""

    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)


class Checkpoint(Base):
    """A resumable training checkpoint, stored under our own key."""

    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(256))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)

    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),)


class Adapter(Base):
    """A published adapter: one version of a named adapter in the registry."""

    __tablename__ = "adapters"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(256))
    version: Mapped[int] = mapped_column(Integer)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256), nullable=True, unique=True)
    base_model: Mapped[str] = mapped_column(String(128))
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    storage_key: Mapped[str] = mapped_column(String(256))
    method: Mapped[str] = mapped_column(String(32))
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    target_modules: Mapped[list[Any]] = mapped_column(JSON, default=list)
    trainable_params: Mapped[int] = mapped_column(BigInteger, default=0)
    base_params: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    techniques: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="ready")
    source: Mapped[str] = mapped_column(String(16), default="job", server_default="job")
    # The version it was trained from (a job that continued a fine-tuned model); no foreign key, so that
    # a parent's id stays named after the parent is gone.
    parent_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)

    __table_args__ = (UniqueConstraint("team_id", "name", "version", name="uq_adapters_name_version"),)


class OutboxMessage(Base):
    """A dispatch waiting to reach the broker; written in the same transaction as its job."""

    __tablename__ = "dispatch_outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(64), default="created")
    created_at: Mapped[float] = mapped_column(Float, default=now)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class AdapterAlias(Base):
    """A movable name such as `support-bot:prod`, pointing at one version of an adapter."""

    __tablename__ = "adapter_aliases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(256))
    alias: Mapped[str] = mapped_column(String(64))
    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    updated_at: Mapped[float] = mapped_column(Float, default=now)

    __table_args__ = (UniqueConstraint("team_id", "name", "alias", name="uq_adapter_aliases_name_alias"),)


class AdapterAliasEvent(Base):
    """The history of an alias: every move, for audit and rollback."""

    __tablename__ = "adapter_alias_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(256))
    alias: Mapped[str] = mapped_column(String(64))
    adapter_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    previous_adapter_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)


class RegistryChange(Base):
    """The registry's change feed: one row per publish, delete or alias move, written with the change.

    Inference servers read it by id (polling, or woken by pub/sub), so they see every change exactly as
    it committed. `kind` is `published`, `deleted` or `alias_moved` (see core/registry.py).
    """

    __tablename__ = "registry_changes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    adapter_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    name: Mapped[str] = mapped_column(String(256))
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    alias: Mapped[str | None] = mapped_column(String(64), nullable=True)
    previous_adapter_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class WorkerRecord(Base):
    """A live training worker and how many jobs it runs at once; the dispatcher hands out only that capacity."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    concurrency: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float, default=now)
    heartbeat_at: Mapped[float] = mapped_column(Float, default=now, index=True)


class ReplicaRecord(Base):
    """A live inference replica: what it serves, what is resident on it and its load, renewed by heartbeat.

    The API routes each request to a replica of the request's base model; a row whose heartbeat is older
    than `replica_ttl_seconds` is ignored, and old rows are deleted (see core/replicas.py).
    """

    __tablename__ = "inference_replicas"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(String(512))
    base_model: Mapped[str] = mapped_column(String(128), index=True)
    engine: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    kinds: Mapped[list[Any]] = mapped_column(JSON, default=list)
    max_resident_adapters: Mapped[int] = mapped_column(Integer)
    max_batch: Mapped[int] = mapped_column(Integer)
    resident_adapters: Mapped[list[Any]] = mapped_column(JSON, default=list)
    load: Mapped[int] = mapped_column(Integer, default=0)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[float] = mapped_column(Float, default=now)
    heartbeat_at: Mapped[float] = mapped_column(Float, default=now, index=True)
