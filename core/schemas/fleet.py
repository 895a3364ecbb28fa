"""Shapes of the training side of the fleet: workers (`GET /v1/workers`) and the queue (`GET /v1/queue`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class WorkerPublic(BaseModel):
    """A live training worker."""

    object: Literal["worker"] = "worker"
    id: str
    concurrency: int
    started_at: float
    heartbeat_at: float


class WorkerList(BaseModel):
    """The live training workers and their total job slots."""

    object: Literal["list"] = "list"
    data: list[WorkerPublic]
    capacity: int


class TeamQueue(BaseModel):
    """One team's unfinished jobs, by state."""

    team: str
    running: int
    queued: int
    paused: int
    oldest_queued_at: float | None


class RunningJob(BaseModel):
    """A running job and the worker holding its lease."""

    id: str
    team: str
    model: str
    worker: str | None
    started_at: float | None
    estimated_finish: float | None


class QueuePublic(BaseModel):
    """`GET /v1/queue`: the training queue across teams."""

    object: Literal["training_queue"] = "training_queue"
    teams: list[TeamQueue]
    running: list[RunningJob]
