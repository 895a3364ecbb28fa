"""The worker's Celery app: the shared configuration plus the task modules, and its capacity announcement."""

from celery.signals import worker_ready, worker_shutdown

from core.queue import get_celery
from worker.capacity import CapacityAnnouncer

app = get_celery()
app.conf.include = ["worker.tasks"]
_announcer: CapacityAnnouncer | None = None


@worker_ready.connect
def _announce_capacity(sender, **_) -> None:
    global _announcer
    _announcer = CapacityAnnouncer(int(sender.controller.concurrency or 1))
    _announcer.start()


@worker_shutdown.connect
def _withdraw_capacity(**_) -> None:
    if _announcer is not None:
        _announcer.stop()
