"""Celery configuration. Tasks are sent by name, so the API never imports the worker."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from core.settings import Settings, get_settings

TRAIN_QUEUE = "train"
TRAIN_TASK = "patchbay.train"


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the configured broker, set up so a crash never loses a job silently."""
    app = Celery("patchbay", broker=settings.resolved_broker_url)
    transport_options: dict = {}
    if settings.resolved_broker_url.startswith(("redis://", "rediss://")):
        # Redis redelivers unacked messages after this; it must outlast any job.
        transport_options["visibility_timeout"] = settings.job_deadline_seconds + 3600
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=TRAIN_QUEUE,
        task_routes={TRAIN_TASK: {"queue": TRAIN_QUEUE}},
        task_ignore_result=True,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    """The process-wide Celery app."""
    return make_celery(get_settings())


def send_train(job_id: str) -> None:
    """Put a job on the `train` queue."""
    get_celery().send_task(TRAIN_TASK, args=[job_id], queue=TRAIN_QUEUE)
