"""Thin Celery tasks: take the lease, run the recipe, record the outcome."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

from core import job_lifecycle
from core.datasets import read_examples
from core.db import session_scope
from core.events import add_event
from core.models import Adapter, BaseModelRecord, File, Job
from core.queue import TRAIN_TASK
from core.schemas.training import StartAdapter
from core.settings import get_settings
from core.storage import Storage, folder_sha256, get_storage
from worker.celery_app import app
from worker.job_context import DbJobContext, LeaseHeartbeat
from worker.metrics import training_metrics

log = logging.getLogger("patchbay.worker")


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@app.task(name=TRAIN_TASK)
def train(job_id: str) -> str:
    """Run one fine-tuning job, unless another worker already holds it."""
    return run_job(job_id)


def run_job(job_id: str) -> str:
    """Take the job's lease and train it to an outcome. Returns what happened."""
    settings = get_settings()
    owner = _worker_id()
    with session_scope() as session:
        if not job_lifecycle.start(session, job_id, owner, lease_seconds=settings.lease_seconds):
            log.info("job %s is not ours to run (finished, cancelled or held elsewhere)", job_id)
            return "skipped"
        job = session.get(Job, job_id)
        add_event(session, job_id, f"Training started on worker {owner} (attempt {job.attempts}).")
    work_dir = Path(tempfile.mkdtemp(prefix=f"patchbay-{job_id}-"))
    metrics, outcome = training_metrics(), "failed"
    metrics.job_started(job_id)
    try:
        with LeaseHeartbeat(job_id, owner, settings) as heartbeat:
            outcome = _train_and_publish(job_id, owner, heartbeat, work_dir)
            return outcome
    finally:
        metrics.job_ended(job_id, outcome)
        shutil.rmtree(work_dir, ignore_errors=True)


def _fetch_start_adapter(start: StartAdapter, storage: Storage, work_dir: Path) -> Path:
    """The folder of the adapter a job continues from, copied into its work dir and checked against its sha256."""
    what = f"the adapter this job continues from, {start.fine_tuned_model or start.name} ({start.id}),"
    with session_scope() as session:
        row = session.get(Adapter, start.id)
        if row is None or row.status != "ready":
            raise RuntimeError(f"{what} was deleted")
    if not storage.exists(start.storage_key):
        raise RuntimeError(f"{what} is missing from storage")
    folder = storage.get_dir(start.storage_key, work_dir / "start-adapter")
    if folder_sha256(folder)[0] != start.sha256:
        raise RuntimeError(f"{what} failed its sha256 check")
    return folder


def _train_and_publish(job_id: str, owner: str, heartbeat: LeaseHeartbeat, work_dir: Path) -> str:
    from core.schemas.training import ResolvedTraining
    from worker.training.interface import TrainingJob, TrainingStopped
    from worker.training.publish import publish_adapter, write_metadata
    from worker.training.recipe import run_training

    storage = get_storage()
    with session_scope() as session:
        job = session.get(Job, job_id)
        base = session.get(BaseModelRecord, job.model)
        training_file = session.get(File, job.training_file)
        validation_file = session.get(File, job.validation_file) if job.validation_file else None
        config = ResolvedTraining.model_validate(job.resolved)
    context = DbJobContext(job_id, heartbeat, storage, work_dir)
    try:
        if base is None:
            raise RuntimeError(f"base model '{job.model}' is no longer registered")
        if training_file is None:
            raise RuntimeError(f"training file '{job.training_file}' was deleted")
        start_dir = _fetch_start_adapter(config.start_adapter, storage, work_dir) if config.start_adapter else None
        training_job = TrainingJob(
            job_id=job_id,
            base_model_path=base.path,
            training_examples=read_examples(str(storage.local_copy(training_file.storage_key, training_file.sha256))),
            validation_examples=(read_examples(str(storage.local_copy(validation_file.storage_key,
                                                                      validation_file.sha256)))
                                 if validation_file else None),
            config=config,
            work_dir=work_dir,
            start_adapter_dir=start_dir,
        )
        result = run_training(training_job, context)
    except TrainingStopped:
        context.event("Training stopped: the job was paused, cancelled or taken over by another worker.", level="warn")
        return "stopped"
    except Exception as exc:
        log.exception("job %s failed", job_id)
        message = f"{exc.__class__.__name__}: {exc}"
        with session_scope() as session:
            if job_lifecycle.fail(session, job_id, code="training_error", message=message, owner=owner):
                add_event(session, job_id, f"Job failed: {message}", level="error")
        return "failed"

    metadata = write_metadata(
        result.adapter_dir, job=job, base=base,
        files={"training_file": training_file, "validation_file": validation_file},
        result_metrics=result.metrics, quantization=result.quantization,
        trainable_params=result.trainable_params, total_params=result.total_params,
        base_params=result.base_params, probe=result.probe,
    )
    with session_scope() as session:
        job = session.get(Job, job_id)
        adapter = publish_adapter(session, storage, job=job, adapter_dir=result.adapter_dir, metadata=metadata)
        if not job_lifecycle.succeed(session, job_id, owner, fine_tuned_model=adapter.fine_tuned_model,
                                     trained_tokens=result.trained_tokens):
            session.rollback()
            storage.delete(adapter.storage_key)
            return "stopped"
        add_event(session, job_id, f"New fine-tuned model created: {adapter.fine_tuned_model}",
                  data={"adapter_id": adapter.id, "name": adapter.name, "version": adapter.version})
        add_event(session, job_id, "The job has successfully completed.")
    return "succeeded"  # publish_adapter's `published` change is announced as this transaction commits
