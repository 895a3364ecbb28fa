"""A training job context for benchmarks: keeps the metrics rows, ignores events, never stops or checkpoints."""

from __future__ import annotations


class QuietContext:
    """The recipe's `JobContext` without a database or storage."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def event(self, message, *, level="info", data=None):
        """Events are dropped."""

    def metrics(self, data):
        """Keep each metrics row."""
        self.rows.append(dict(data))

    def should_stop(self):
        """A benchmark run is never stopped."""
        return False

    def latest_checkpoint(self):
        """Never resumes."""
        return None

    def save_checkpoint(self, step, folder, metrics):
        """Checkpoints are dropped."""
