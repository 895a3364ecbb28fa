"""The worker's Celery app: the shared configuration plus the task modules."""

from core.queue import get_celery

app = get_celery()
app.conf.include = ["worker.tasks"]
