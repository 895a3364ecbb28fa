"""The fine-tuning spec: OpenAI hyperparameters plus our `peft` extension object.

The API validates a job against these models; the worker trains from the resolved form.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Auto = Literal["auto"]
PeftMethod = Literal["qlora", "lora", "dora"]
Quantization = Literal["nf4-dq", "nf4", "none"]
LrScheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]

BASE_LEARNING_RATE = 2e-4
"""The learning rate that `learning_rate_multiplier=1` means."""


class Hyperparameters(BaseModel):
    """OpenAI's hyperparameters; each may be `"auto"` until the job resolves it."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto = Field("auto", description="passes over the training file")
    batch_size: int | Auto = Field("auto", description="examples per optimizer step")
    learning_rate_multiplier: float | Auto = Field("auto", description="times 2e-4")

    @model_validator(mode="after")
    def _ranges(self) -> "Hyperparameters":
        if isinstance(self.n_epochs, int) and not 1 <= self.n_epochs <= 50:
            raise ValueError("n_epochs must be between 1 and 50")
        if isinstance(self.batch_size, int) and not 1 <= self.batch_size <= 256:
            raise ValueError("batch_size must be between 1 and 256")
        if isinstance(self.learning_rate_multiplier, float | int) and not (
            0 < self.learning_rate_multiplier <= 100
        ):
            raise ValueError("learning_rate_multiplier must be in (0, 100]")
        return self


class PeftConfigSpec(BaseModel):
    """Patchbay's extension object `peft`: the adapter and recipe knobs."""

    model_config = ConfigDict(extra="forbid")

    method: PeftMethod = "qlora"
    r: int = Field(16, ge=1, le=256)
    alpha: float | None = Field(None, gt=0, description="defaults to 2*r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    quantization: Quantization | None = Field(
        None, description="defaults to nf4-dq for qlora and none otherwise"
    )
    max_seq_length: int = Field(1024, ge=16, le=32768)
    packing: bool = True
    train_on_inputs: bool = False
    gradient_checkpointing: bool = False
    learning_rate: float | None = Field(None, gt=0, le=1, description="overrides the multiplier")
    lr_scheduler: LrScheduler = "linear"
    warmup_ratio: float = Field(0.03, ge=0, le=0.5)
    weight_decay: float = Field(0.0, ge=0, le=1)
    eval_every_steps: int | None = Field(None, ge=1)
    checkpoint_every_steps: int = Field(50, ge=1)
    max_steps: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _method_fits_quantization(self) -> "PeftConfigSpec":
        if self.method == "qlora" and self.quantization == "none":
            raise ValueError("method 'qlora' needs a 4-bit quantization (nf4-dq or nf4)")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules must name at least one module, or be 'all-linear'")
        return self


class ResolvedTraining(BaseModel):
    """Everything the worker needs to train, with no `"auto"` left."""

    n_epochs: int
    batch_size: int
    learning_rate: float
    learning_rate_multiplier: float
    seed: int
    peft: PeftConfigSpec
    quantization: Quantization
    lora_alpha: float


def resolve_training(
    hyper: Hyperparameters, peft: PeftConfigSpec, n_examples: int, seed: int
) -> ResolvedTraining:
    """Turn every `"auto"` into a number chosen from the dataset size."""
    n = max(1, n_examples)
    if hyper.n_epochs == "auto":
        # Aim for 100..25000 examples seen, three passes where that fits.
        n_epochs = 3
        if n * n_epochs < 100:
            n_epochs = min(25, math.ceil(100 / n))
        elif n * n_epochs > 25000:
            n_epochs = max(1, 25000 // n)
    else:
        n_epochs = hyper.n_epochs
    batch_size = hyper.batch_size if hyper.batch_size != "auto" else max(1, min(8, n // 16))
    multiplier = (
        1.0 if hyper.learning_rate_multiplier == "auto" else float(hyper.learning_rate_multiplier)
    )
    learning_rate = peft.learning_rate or BASE_LEARNING_RATE * multiplier
    quantization = peft.quantization or ("nf4-dq" if peft.method == "qlora" else "none")
    return ResolvedTraining(
        n_epochs=n_epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        learning_rate_multiplier=multiplier,
        seed=seed,
        peft=peft,
        quantization=quantization,
        lora_alpha=peft.alpha or 2.0 * peft.r,
    )
