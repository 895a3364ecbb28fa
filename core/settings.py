"""The one Settings object, read from PATCHBAY_* environment variables and `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, computed_field
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

    max_upload_bytes: int = Field(512 * 1024 * 1024, description="largest accepted upload (413 above)")
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
    default_team: str = Field("default", description="team that `patchbay serve` creates")

    inference_url: str = Field(
        "http://127.0.0.1:8001", description="inference server(s) the API forwards to; comma-separated replicas"
    )
    inference_base_model: str = Field("smollm2-135m-instruct", description="base model the inference server loads")
    inference_quantization: str = Field("none", description="inference base: 'nf4-dq' (4-bit) or 'none'")
    max_loaded_adapters: int = Field(8, description="adapters resident in an inference server (LRU beyond)")
    max_lora_rank: int = Field(64, description="largest LoRA rank accepted for import and serving")
    pinned_adapters: str = Field("", description="comma-separated adapter refs loaded at start and never evicted")
    merged_adapter: str | None = Field(None, description="serve this one adapter merged into the base")
    registry_poll_seconds: float = Field(2.0, description="alias/publish polling when the broker is not Redis")

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
        """Every inference replica's base URL."""
        return [u.strip().rstrip("/") for u in self.inference_url.split(",") if u.strip()]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_storage_dir(self) -> Path:
        """The local storage root in force."""
        return (self.storage_dir or self.data_dir / "storage").resolve()


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings
