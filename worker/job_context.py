"""The recipe's view of its job: events, checkpoints, cancellation and the lease heartbeat."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from sqlalchemy import select

from core.db import session_scope
from core.events import add_event
from core.ids import new_id, now
from core.leases import holds_lease, renew_lease
from core.models import Checkpoint, Job
from core.settings import Settings
from core.storage import Storage
from worker.metrics import training_metrics

log = logging.getLogger("patchbay.worker")
STATUS_CHECK_SECONDS = 1.0


class LeaseHeartbeat:
    """Renews the job's lease in the background; sets `lost` once the job is no longer ours."""

    def __init__(self, job_id: str, owner: str, settings: Settings) -> None:
        self.job_id, self.owner, self.settings = job_id, owner, settings
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> "LeaseHeartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def renew_now(self) -> bool:
        """Renew once; False (and `lost` set) when the job was cancelled or taken over."""
        try:
            with session_scope() as session:
                held = renew_lease(session, self.job_id, self.owner, self.settings.lease_seconds)
        except Exception:  # a database hiccup is not a lost lease; try again next beat
            log.warning("lease renewal for %s failed", self.job_id, exc_info=True)
            return not self.lost.is_set()
        if not held:
            self.lost.set()
        return held

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            if not self.renew_now():
                return


class DbJobContext:
    """Implements the recipe's JobContext (worker.training.interface) over the database and storage."""

    def __init__(self, job_id: str, heartbeat: LeaseHeartbeat, storage: Storage, work_dir: Path) -> None:
        self.job_id, self.heartbeat, self.storage, self.work_dir = job_id, heartbeat, storage, work_dir
        self._last_status_check = 0.0

    def event(self, message: str, *, level: str = "info", data: dict | None = None) -> None:
        """Write a message event."""
        with session_scope() as session:
            add_event(session, self.job_id, message, level=level, data=data)

    def metrics(self, data: dict) -> None:
        """Write a metrics event and refresh the job's estimated finish."""
        step, total = data.get("step"), data.get("total_steps")
        loss = data.get("train_loss")
        message = f"Step {step}/{total}: training loss={loss:.4f}" if loss is not None else f"Step {step}/{total}"
        training_metrics().job_progress(self.job_id, data)
        with session_scope() as session:
            add_event(session, self.job_id, message, type="metrics", data=data)
            eta = data.get("eta_seconds")
            if eta is not None:
                job = session.get(Job, self.job_id)
                job.estimated_finish = now() + float(eta)

    def should_stop(self) -> bool:
        """True once the job was cancelled or its lease lost (checked at most once a second)."""
        if self.heartbeat.lost.is_set():
            return True
        if time.monotonic() - self._last_status_check >= STATUS_CHECK_SECONDS:
            self._last_status_check = time.monotonic()
            with session_scope() as session:
                if not holds_lease(session, self.job_id, self.heartbeat.owner):
                    self.heartbeat.lost.set()
        return self.heartbeat.lost.is_set()

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        """The newest stored checkpoint, copied to local scratch."""
        with session_scope() as session:
            row = session.scalar(select(Checkpoint).where(Checkpoint.job_id == self.job_id)
                                 .order_by(Checkpoint.step.desc()).limit(1))
            if row is None:
                return None
            step, key = row.step, row.storage_key
        training_metrics().job_resumed(self.job_id)
        return step, self.storage.get_dir(key, self.work_dir / f"resume-{step}")

    def save_checkpoint(self, step: int, folder: Path, metrics: dict) -> None:
        """Store a checkpoint folder and record it."""
        key = f"checkpoints/{self.job_id}/step-{step:08d}"
        self.storage.put_dir(key, folder)
        with session_scope() as session:
            exists = session.scalar(select(Checkpoint.id).where(Checkpoint.job_id == self.job_id,
                                                                Checkpoint.step == step))
            if not exists:
                session.add(Checkpoint(id=new_id("ftckpt"), job_id=self.job_id, step=step, storage_key=key,
                                       metrics=metrics))
