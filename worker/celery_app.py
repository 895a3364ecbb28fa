"""The worker's Celery app: the shared configuration plus the task modules, its capacity announcement and its
metrics port (opened by the main process before the pool forks; see `worker.metrics`)."""

from celery.signals import worker_init, worker_ready, worker_shutdown

from core.queue import get_celery
from core.settings import get_settings
from core.storage import report_storage
from worker.capacity import CapacityAnnouncer
from worker.metrics import serve_worker_metrics, stop_worker_metrics

app = get_celery()
app.conf.include = ["worker.tasks"]
_announcer: CapacityAnnouncer | None = None
_metrics_server = None


@worker_init.connect
def _serve_metrics(**_) -> None:
    global _metrics_server
    _metrics_server = serve_worker_metrics(get_settings().worker_metrics_port)


@worker_init.connect
def _check_storage(**_) -> None:
    report_storage()  # a missing bucket or bad credentials: a clear error in the log at start


@worker_ready.connect
def _announce_capacity(sender, **_) -> None:
    global _announcer
    _announcer = CapacityAnnouncer(int(sender.controller.concurrency or 1))
    _announcer.start()


@worker_shutdown.connect
def _withdraw_capacity(**_) -> None:
    if _announcer is not None:
        _announcer.stop()
    stop_worker_metrics(_metrics_server)
