"""The one Settings object, read from PATCHBAY_* environment variables and `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, computed_field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of a Patchbay deployment. Defaults give the embedded single-machine setup."""

    model_config = SettingsConfigDict(env_prefix="PATCHBAY_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("./data"), description="local storage, SQLite files and the model store")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under data_dir")
    broker_url: str | None = Field(
        None, description="Celery broker; default kombu's SQLAlchemy transport on SQLite under data_dir"
    )
    storage_dir: Path | None = Field(None, description="local object storage; default data_dir/storage")
    storage_url: str | None = Field(
        None, description="object storage: file:///path, or s3://bucket/prefix (credentials from AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_REGION); default the local storage_dir"
    )
    s3_endpoint_url: str | None = Field(None, description="endpoint of an S3-compatible server (SeaweedFS, MinIO)")
    storage_cache_bytes: int = Field(
        10 * 1024**3, description="local cache of objects fetched from S3 (data_dir/cache; LRU beyond)"
    )

    max_upload_bytes: int = Field(512 * 1024 * 1024, description="largest accepted upload (413 above)")
    max_json_bytes: int = Field(1024 * 1024, description="largest JSON request body (413 above)")
    max_chat_bytes: int = Field(
        8 * 1024 * 1024, description="largest body of /v1/chat/completions and /v1/completions (413 above)"
    )
    max_line_bytes: int = Field(
        128 * 1024 * 1024, description="longest dataset line accepted (longer lines are errors)"
    )
    body_idle_timeout_seconds: float = Field(
        30.0, description="a request body that sends nothing for this long is cut off (408)"
    )
    check_workers: int = Field(2, description="processes that check uploads (datasets, archives) off the event loop")
    db_pool_timeout_seconds: float = Field(
        10.0, description="wait this long for a database connection before answering 503"
    )
    sweep_interval_seconds: float = Field(600.0, description="how often orphaned temporary uploads are looked for")
    orphan_age_seconds: float = Field(
        3600.0, description="a stored object with no row, or another host's temporary, is removed after this long"
    )

    team_max_concurrent_uploads: int = Field(4, description="uploads one team may stream at once per API (429)")
    team_max_event_streams: int = Field(16, description="live event streams one team may hold per API (429)")
    team_max_running_jobs: int = Field(0, description="jobs of one team that train at once (0: unlimited)")
    team_max_queued_jobs: int = Field(0, description="jobs of one team waiting to train (429 above; 0: unlimited)")
    team_storage_bytes: int = Field(0, description="bytes of files and adapters one team may store (413; 0: unlimited)")
    team_requests_per_minute: int = Field(
        0, description="inference requests per minute per team (429 above; 0: unlimited)"
    )
    team_tokens_per_minute: int = Field(
        0, description="generated tokens per minute per team (429 above; 0: unlimited)"
    )
    key_requests_per_minute: int = Field(
        1200, description="requests per minute per API key on every other route (429 above; 0: unlimited)"
    )
    failed_auth_per_minute: int = Field(
        60, description="failed authentications per minute per client address (429 above; 0: unlimited)"
    )
    job_deadline_seconds: int = Field(6 * 3600, description="a job not finished by then is failed")
    lease_seconds: float = Field(60.0, description="a running job's lease; renewed by heartbeat")
    heartbeat_seconds: float = Field(5.0, description="how often a worker renews its lease")
    redispatch_after_seconds: float = Field(
        120.0, description="re-send a queued job that no worker took after this long"
    )
    dispatch_interval_seconds: float = Field(1.0, description="how often the outbox is drained")
    reconcile_interval_seconds: float = Field(10.0, description="how often lost jobs are looked for")
    run_dispatcher: bool = Field(True, description="run the outbox dispatcher and reconciler in the API")
    worker_concurrency: int = Field(1, description="training jobs one worker runs at once")
    worker_allocator: Literal["tcmalloc", "system"] = Field(
        "tcmalloc", description="memory allocator of a training worker: tcmalloc where libtcmalloc-minimal4 is "
        "installed (the system's malloc otherwise), or the system's malloc"
    )
    default_team: str = Field("default", description="team that `patchbay serve` creates")

    inference_url: str = Field(
        "", description="static inference replicas, comma-separated, for replicas that cannot reach the database "
        "(each is asked what it serves at its /status); registered replicas need no listing"
    )
    inference_base_model: str = Field("smollm2-135m-instruct", description="base model the inference server loads")
    inference_engine: Literal["patchbay", "vllm"] = Field(
        "patchbay", description="engine of `patchbay inference`: ours, or vLLM from its own environment"
    )
    inference_advertise_url: str | None = Field(
        None, description="URL the API reaches this inference server at; default http://HOST:PORT it binds"
    )
    replica_heartbeat_seconds: float = Field(2.0, description="how often an inference replica renews its row")
    replica_ttl_seconds: float = Field(
        10.0, description="a replica whose heartbeat is older than this is dropped from routing"
    )
    replica_wait_seconds: float = Field(
        30.0, description="hold a request this long for a replica of its base that is still starting (then 503)"
    )
    routing_policy: Literal["affinity", "round_robin"] = Field(
        "affinity", description="replica choice: adapter affinity with bounded load, or plain round-robin"
    )
    serve_base_models: str = Field(
        "", description="base models `patchbay serve` starts a replica for, comma-separated (default: the "
        "default SmolLM2 base)"
    )
    vllm_python: Path | None = Field(
        None, description="python of the vLLM environment; default .venv-vllm beside the code, as `make install` "
        "sets it up"
    )
    vllm_max_loras: int = Field(8, description="LoRA adapters one vLLM replica keeps resident")
    vllm_extra_args: str = Field("", description="extra arguments for vLLM's OpenAI server, space-separated")
    inference_quantization: str = Field("none", description="inference base: 'nf4-dq' (4-bit) or 'none'")
    max_loaded_adapters: int = Field(8, description="adapters resident in an inference server (LRU beyond)")
    inference_max_batch_size: int = Field(64, ge=1, le=1024, description="sequences one engine decodes together; "
                                          "more wait for a place (a request that finds the batch full waits for a "
                                          "running one to finish before its first token)")
    inference_prefix_cache_mb: int = Field(256, ge=0, le=1_048_576, description="memory our engine keeps for "
                                           "prompt prefixes already prefilled, per base and adapter, so that prompts "
                                           "opening the same way prefill only the rest (0: off)")
    max_lora_rank: int = Field(64, description="largest LoRA rank accepted for import and serving")
    pinned_adapters: str = Field("", description="comma-separated adapter refs loaded at start and never evicted")
    merged_adapter: str | None = Field(None, description="serve this one adapter merged into the base")
    registry_poll_seconds: float = Field(2.0, description="registry change-feed polling when the broker is not Redis")
    metrics_enabled: bool = Field(True, description="serve Prometheus metrics at /metrics on the API and inference "
                                  "servers (no key needed)")
    worker_metrics_port: int = Field(
        9101, description="port of a training worker's Prometheus metrics (/metrics on every path; 0: off)"
    )

    @field_validator("vllm_python", "inference_advertise_url", "database_url", "broker_url", "storage_dir",
                     "storage_url", "s3_endpoint_url", "merged_adapter", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        """An empty variable (as `.env.example` leaves some) means the default, not the path '.'."""
        return None if value == "" else value

    @field_validator("storage_url")
    @classmethod
    def _storage_url_scheme(cls, value: str | None) -> str | None:
        """Refuse at start what no storage backend serves."""
        if value is not None and not (value.startswith("file:///") or (value.startswith("s3://") and len(value) > 5)):
            raise ValueError(f"must be file:///path or s3://bucket/prefix, not {value!r}")
        return value

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_database_url(self) -> str:
        """The database URL in force."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'patchbay.sqlite').resolve()}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_broker_url(self) -> str:
        """The Celery broker URL in force."""
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def inference_urls(self) -> list[str]:
        """The static inference replicas' base URLs."""
        return _comma_list(self.inference_url, strip="/")

    @property
    def serve_base_model_ids(self) -> list[str]:
        """The base models `patchbay serve` starts replicas for."""
        return _comma_list(self.serve_base_models) or [self.inference_base_model]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_storage_dir(self) -> Path:
        """The local storage root in force."""
        return (self.storage_dir or self.data_dir / "storage").resolve()


def _comma_list(text: str, strip: str = "") -> list[str]:
    return [item.strip().rstrip(strip) for item in text.split(",") if item.strip()]


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings
