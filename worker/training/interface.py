"""The recipe's interface to the worker: the job it trains, the context it reports to, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from core.datasets import Example
from core.schemas.training import ResolvedTraining


@dataclass
class TrainingJob:
    """What to train: the base model folder, the examples and the resolved configuration."""

    job_id: str
    base_model_path: str
    training_examples: list[Example]
    validation_examples: list[Example] | None
    config: ResolvedTraining
    work_dir: Path  # scratch folder, exists
    start_adapter_dir: Path | None = None  # the fetched, verified folder of `config.start_adapter`
    start_adapter_dir: Path | None = None
    """The adapter a continuing job starts from (its artifact folder), or None for a fresh adapter."""


class JobContext(Protocol):
    """The worker's side of a running job: events, metrics, cancellation and checkpoint storage."""

    def event(self, message: str, *, level: str = "info", data: dict | None = None) -> None: ...
    def metrics(self, data: dict) -> None: ...
    def should_stop(self) -> bool: ...  # cancelled, or the lease was lost
    def latest_checkpoint(self) -> tuple[int, Path] | None: ...  # (step, local folder) to resume from
    # Uploads and records the checkpoint; the folder may be deleted afterwards.
    def save_checkpoint(self, step: int, folder: Path, metrics: dict) -> None: ...


class TrainingStopped(Exception):
    """Training stopped because the context asked it to (cancelled, or the lease was lost)."""


@dataclass
class TrainResult:
    """What a finished training run produced."""

    adapter_dir: Path
    steps: int
    trained_tokens: int  # labelled+context real tokens processed, counting every epoch
    metrics: dict  # final train_loss, valid_loss, first_train_loss, ...
    quantization: dict  # quantization_report
    trainable_params: int
    total_params: int
    base_params: int  # the base model's logical size (4-bit weights unquantized), adapter excluded
    probe: dict  # logits of the trained in-memory model on a few positions (see artifacts.probe_record)
