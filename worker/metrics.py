"""A training worker's Prometheus metrics: jobs started, succeeded, failed, stopped and resumed, and each running
job's tokens/s, step time and step, served by the worker's main process on `PATCHBAY_WORKER_METRICS_PORT`.

Celery's prefork pool trains in child processes, while the port belongs to the main process. prometheus_client's
multiprocess mode cannot remove a series (a finished job's tokens/s would stay forever), so each process that
trains keeps a small JSON snapshot of its counters and live jobs in a spool folder of the main process
(written atomically after every change), and the main process reads them at scrape time: counters are summed
over every snapshot, a job's series come only from processes still alive, and a job's series go when it ends.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from core.temporaries import pid_alive

log = logging.getLogger("patchbay.worker.metrics")
EVENTS = ("started", "succeeded", "failed", "stopped", "resumed")
"""What `patchbay_training_jobs_total` counts, by its `event` label."""
_spool: Path | None = None
_recorder: TrainingMetrics | None = None
_recorder_lock = threading.Lock()


def spool_dir() -> Path:
    """This worker's spool folder: the one its main process chose (inherited by forked children), else its own."""
    return _spool or Path(tempfile.gettempdir()) / "patchbay-worker-metrics" / str(os.getpid())


class TrainingMetrics:
    """The training counters and live jobs of the process that trains, kept in its snapshot file."""

    def __init__(self, folder: Path) -> None:
        self.pid = os.getpid()
        self.path = folder / f"{self.pid}-{uuid.uuid4().hex[:8]}.json"
        self._counts: collections.Counter[str] = collections.Counter()
        self._jobs: dict[str, dict] = {}
        self._last_step: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def job_started(self, job_id: str) -> None:
        """A job started training here."""
        def update() -> None:
            self._counts.update(["started"])
            self._jobs[job_id] = {}

        self._change(update)

    def job_resumed(self, job_id: str) -> None:
        """A job resumes from a checkpoint."""
        self._change(lambda: self._counts.update(["resumed"]))

    def job_progress(self, job_id: str, data: dict) -> None:
        """A metrics record of the recipe (step, total_steps, tokens_per_second): the job's live series.
        The step time is the mean over the steps since the job's previous record."""
        step, at = int(data.get("step") or 0), time.monotonic()

        def update() -> None:
            job = self._jobs.get(job_id)
            if job is None:  # not started here (or already ended): no live series
                return
            job.update(step=step, total_steps=data.get("total_steps") or 0,
                       tokens_per_second=float(data.get("tokens_per_second") or 0.0))
            previous = self._last_step.get(job_id)
            if previous is not None and step > previous[1]:
                job["step_seconds"] = (at - previous[0]) / (step - previous[1])
            self._last_step[job_id] = (at, step)

        self._change(update)

    def job_ended(self, job_id: str, outcome: str) -> None:
        """The job left this process (`succeeded`, `failed` or `stopped`): count it and drop its series."""

        def update() -> None:
            self._jobs.pop(job_id, None)
            self._last_step.pop(job_id, None)
            if outcome in EVENTS:
                self._counts[outcome] += 1

        self._change(update)

    def _change(self, update) -> None:
        with self._lock:
            update()
            snapshot = {"pid": self.pid, "counts": dict(self._counts), "jobs": self._jobs}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                temporary = self.path.with_suffix(".tmp")
                temporary.write_text(json.dumps(snapshot))
                os.replace(temporary, self.path)
            except OSError as exc:  # metrics never fail a job
                log.warning("worker metrics: cannot write %s: %s", self.path, exc)


def training_metrics() -> TrainingMetrics:
    """This process's recorder (a forked child gets its own, in the main process's spool folder)."""
    global _recorder
    with _recorder_lock:
        folder = spool_dir()
        if _recorder is None or _recorder.pid != os.getpid() or _recorder.path.parent != folder:
            _recorder = TrainingMetrics(folder)
        return _recorder


class SpoolCollector:
    """Reads every snapshot of the spool folder at scrape time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self):
        counts: collections.Counter[str] = collections.Counter({event: 0 for event in EVENTS})
        jobs: dict[str, dict] = {}
        for path in sorted(self.folder.glob("*.json")):
            try:
                snapshot = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # removed meanwhile
            counts.update(snapshot.get("counts", {}))
            if pid_alive(int(snapshot.get("pid", 0))):
                jobs.update(snapshot.get("jobs", {}))
        total = CounterMetricFamily("patchbay_training_jobs", "Training jobs by event: started, succeeded, failed, "
                                    "stopped (paused, cancelled or taken over) and resumed from a checkpoint.",
                                    labels=["event"])
        for event in EVENTS:
            total.add_metric([event], counts[event])
        yield total
        running = GaugeMetricFamily("patchbay_training_jobs_running", "Jobs training in this worker now.")
        running.add_metric([], len(jobs))
        yield running
        for name, key, text in (
            ("patchbay_training_tokens_per_second", "tokens_per_second", "A running job's real (unpadded) "
             "tokens per second of wall time, since it started in this process."),
            ("patchbay_training_step_seconds", "step_seconds", "A running job's seconds per optimizer step, "
             "over the steps since its previous metrics record."),
            ("patchbay_training_step", "step", "A running job's optimizer steps done."),
            ("patchbay_training_total_steps", "total_steps", "A running job's optimizer steps in all."),
        ):
            family = GaugeMetricFamily(name, text, labels=["job"])
            for job_id, job in sorted(jobs.items()):
                if key in job:
                    family.add_metric([job_id], job[key])
            yield family


def serve_worker_metrics(port: int, host: str = "0.0.0.0"):
    """Serve this process's spool folder on `port` (the worker's main process, before its pool forks);
    returns the server, or None when the port is 0 or taken (logged; the worker runs on without metrics)."""
    global _spool
    if port <= 0:
        return None
    _spool = Path(tempfile.gettempdir()) / "patchbay-worker-metrics" / str(os.getpid())
    shutil.rmtree(_spool, ignore_errors=True)
    _spool.mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    registry.register(SpoolCollector(_spool))
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error("worker metrics: cannot listen on port %d: %s; running without them", port, exc)
        return None
    log.info("worker metrics at http://%s:%d/metrics", host, port)
    return server


def stop_worker_metrics(server) -> None:
    """Stop serving and remove the spool folder."""
    global _spool
    if server is not None:
        server.shutdown()
        server.server_close()
    if _spool is not None:
        shutil.rmtree(_spool, ignore_errors=True)
        _spool = None
