"""The fine-tuning spec: OpenAI hyperparameters plus our `peft` extension object.

The API validates a job against these models; the worker trains from the resolved form.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.schemas.bounds import ModuleList, StepCount
from core.schemas.common import FieldProblems
from core.schemas.peft_methods import (
    PROMPT_LEARNING,
    RANKED_METHODS,
    WEIGHT_DELTA_METHODS,
    AdaLoraSpec,
    BottleneckSpec,
    Ia3Spec,
    PeftMethod,
    PromptSpec,
    SparseSpec,
)

Auto = Literal["auto"]
Quantization = Literal["nf4-dq", "nf4", "none"]
LrScheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
TrainingMethod = Literal["supervised", "dpo"]

DPO_LEARNING_RATE_FACTOR = 0.25
"""DPO steps at a quarter of the method's supervised rate at multiplier 1 (5e-5 for LoRA): at the full rate,
bench/dpo.py's DPO-after-SFT adapter won every pair but lost the answers' facts (over-optimisation)."""
DEFAULT_DPO_BETA = 0.1
"""DPO's beta when `"auto"`: the usual choice (DPO paper, TRL); lower trusts the preferences more."""

BASE_LEARNING_RATE = 2e-4
"""The learning rate that `learning_rate_multiplier=1` means for the LoRA family."""
METHOD_BASE_LEARNING_RATES = {
    "ia3": 3e-3,
    "prefix_tuning": 1e-2,
    "prompt_tuning": 3e-2,
    "p_tuning": 3e-3,
    "bottleneck_adapter": 1e-3,
}
"""Methods whose few parameters need a larger step than LoRA's at `learning_rate_multiplier=1`."""


class Hyperparameters(BaseModel):
    """OpenAI's hyperparameters; each may be `"auto"` until the job resolves it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_epochs: int | Auto = Field("auto", description="passes over the training file")
    batch_size: int | Auto = Field("auto", description="examples per optimizer step")
    learning_rate_multiplier: float | Auto = Field("auto", description="times 2e-4")

    @model_validator(mode="after")
    def _ranges(self) -> "Hyperparameters":
        problems = self._range_problems()
        if problems:
            raise FieldProblems(problems)  # named relative to this object: the error edge adds its path
        return self

    def _range_problems(self) -> list[tuple[str, str]]:
        problems = []
        if isinstance(self.n_epochs, int) and not 1 <= self.n_epochs <= 50:
            problems.append(("n_epochs", "n_epochs must be between 1 and 50"))
        if isinstance(self.batch_size, int) and not 1 <= self.batch_size <= 256:
            problems.append(("batch_size", "batch_size must be between 1 and 256"))
        if isinstance(self.learning_rate_multiplier, float | int) and not (
            0 < self.learning_rate_multiplier <= 100
        ):
            problems.append(("learning_rate_multiplier", "learning_rate_multiplier must be in (0, 100]"))
        return problems


class DpoHyperparameters(Hyperparameters):
    """`method.dpo.hyperparameters`: OpenAI's, plus DPO's `beta`."""

    beta: float | Auto = Field("auto", description="strength of the pull towards the reference model; "
                               f"auto = {DEFAULT_DPO_BETA}")

    def _range_problems(self) -> list[tuple[str, str]]:
        problems = super()._range_problems()
        if isinstance(self.beta, float | int) and not 0 < self.beta <= 10:
            problems.append(("beta", "beta must be in (0, 10]"))
        return problems


class PeftConfigSpec(BaseModel):
    """Patchbay's extension object `peft`: the method, its parameters, the techniques and the recipe knobs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: PeftMethod = "qlora"
    r: int = Field(16, ge=1, le=256, description="rank (lora, qlora, dora, loha, lokr, hra; adalora's target)")
    alpha: float | None = Field(None, gt=0, le=100_000, description="defaults to 2*r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: ModuleList | Literal["all-linear"] = "all-linear"
    quantization: Quantization | None = Field(
        None, description="defaults to nf4-dq for qlora and none otherwise"
    )
    adalora: AdaLoraSpec | None = None
    ia3: Ia3Spec | None = None
    prompt: PromptSpec | None = None
    bottleneck: BottleneckSpec | None = None
    sparse: SparseSpec | None = None
    layer_drop: float | None = Field(None, ge=0, lt=1, description="chance that a decoder layer is skipped per step")
    layerwise_lr_decay: float | None = Field(None, gt=0, le=1, description="layer l trains at lr*decay^(L-1-l)")
    max_seq_length: int = Field(1024, ge=16, le=32768)
    packing: bool | None = Field(None, description="defaults to true, except for prompt-learning methods")
    train_on_inputs: bool = False
    gradient_checkpointing: bool | Auto = Field(
        "auto", description="recompute each layer's activations in backward: true, false, or auto (on when a row's "
        "measured activations would exceed half the memory available to the worker)"
    )
    learning_rate: float | None = Field(None, gt=0, le=1, description="overrides the multiplier")
    lr_scheduler: LrScheduler = "linear"
    warmup_ratio: float = Field(0.03, ge=0, le=0.5)
    weight_decay: float = Field(0.0, ge=0, le=1)
    eval_every_steps: StepCount | None = None
    checkpoint_every_steps: StepCount = 50
    max_steps: StepCount | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "PeftConfigSpec":
        problems = spec_problems(self)
        if problems:
            raise FieldProblems(problems)
        return self


_METHOD_OBJECTS = {
    "adalora": ("adalora",),
    "ia3": ("ia3",),
    "prompt": PROMPT_LEARNING,
    "bottleneck": ("bottleneck_adapter",),
}


def spec_problems(spec: PeftConfigSpec) -> list[tuple[str, str]]:
    """Every inconsistency of a spec as (field, reason) pairs (empty when the spec is usable)."""
    problems = []
    method, quantized = spec.method, resolved_quantization(spec) != "none"
    explicit = _changed_fields(spec)
    if method == "qlora" and spec.quantization == "none":
        problems.append(("peft.quantization", "method 'qlora' needs a 4-bit quantization (nf4-dq or nf4)"))
    if method in WEIGHT_DELTA_METHODS and quantized:
        problems.append(("peft.quantization", f"method '{method}' cannot train on a 4-bit base (peft has no "
                         "bitsandbytes 4-bit layer for it, and its update rewrites the whole weight); use 'none'"))
    if isinstance(spec.target_modules, list) and not spec.target_modules:
        problems.append(("peft.target_modules", "must name at least one module, or be 'all-linear'"))
    if method not in RANKED_METHODS:
        for name in ("r", "alpha", "dropout", "target_modules"):
            if name in explicit:
                problems.append((f"peft.{name}", f"does not apply to method '{method}'"))
    for field, methods in _METHOD_OBJECTS.items():
        if getattr(spec, field) is not None and method not in methods:
            problems.append((f"peft.{field}", f"applies only to method {' or '.join(repr(m) for m in methods)}"))
    if spec.prompt is not None:
        problems += _prompt_problems(spec.prompt, method, explicit=_changed_fields(spec.prompt))
    if method in PROMPT_LEARNING and spec.packing:
        problems.append(("peft.packing", f"method '{method}' prepends virtual tokens to every example, so "
                         "examples cannot be packed; leave packing unset or false"))
    if method == "prefix_tuning" and spec.gradient_checkpointing is True:
        problems.append(("peft.gradient_checkpointing", "method 'prefix_tuning' feeds every layer a prefix cache, "
                         "which activation checkpointing cannot recompute; leave it off"))
    if spec.adalora is not None and spec.adalora.init_r is not None and spec.adalora.init_r < spec.r:
        problems.append(("peft.adalora.init_r", "must be at least peft.r (AdaLoRA prunes from init_r down to r)"))
    if spec.sparse is not None:
        problems += _sparse_problems(spec.sparse, quantized)
    return problems


def _changed_fields(model: BaseModel) -> set[str]:
    """Fields that differ from their defaults (unlike `model_fields_set`, this survives a JSON round trip)."""
    return {name for name, info in type(model).model_fields.items()
            if not info.is_required() and getattr(model, name) != info.get_default(call_default_factory=True)}


def _prompt_problems(prompt: PromptSpec, method: str, explicit: set[str]) -> list[tuple[str, str]]:
    owners = {"init_text": ("prompt_tuning",), "encoder": ("p_tuning",),
              "encoder_hidden_size": ("p_tuning", "prefix_tuning"), "prefix_projection": ("prefix_tuning",)}
    return [(f"peft.prompt.{name}", f"applies only to method {' or '.join(repr(m) for m in methods)}")
            for name, methods in owners.items() if name in explicit and method not in methods]


def _sparse_problems(sparse: SparseSpec, quantized: bool) -> list[tuple[str, str]]:
    problems = []
    explicit = _changed_fields(sparse)
    if sparse.kind == "modules" and not sparse.modules:
        problems.append(("peft.sparse.modules", "kind 'modules' needs the modules or layers to train"))
    if sparse.kind == "top_k" and quantized and not sparse.modules:
        problems.append(("peft.sparse.modules", "kind 'top_k' on a 4-bit base needs the modules to search, "
                         "which are kept in full precision (4-bit weights cannot train)"))
    for name in ("density", "warmup_steps"):
        if name in explicit and sparse.kind != "top_k":
            problems.append((f"peft.sparse.{name}", "applies only to kind 'top_k'"))
    return problems


class StartAdapter(BaseModel):
    """The team's adapter version a job continues from (its `model` named it): where its weights are stored."""

    id: str
    fine_tuned_model: str | None
    name: str
    version: int
    storage_key: str
    sha256: str
    method: str


class ResolvedTraining(BaseModel):
    """Everything the worker needs to train, with no `"auto"` left (the method's own object filled in)."""

    n_epochs: int
    batch_size: int
    learning_rate: float
    learning_rate_multiplier: float
    seed: int
    peft: PeftConfigSpec
    quantization: Quantization
    lora_alpha: float
    expected_steps: int | None = None  # optimizer steps if no example is dropped
    method: TrainingMethod = "supervised"
    beta: float | None = None
    """DPO's beta (dpo jobs only)."""
    start_adapter: StartAdapter | None = None
    """The adapter whose weights training starts from (a job whose `model` named a fine-tuned model)."""


def resolved_quantization(spec: PeftConfigSpec) -> Quantization:
    """The spec's quantization, or its method's default: nf4-dq for qlora, none otherwise."""
    return spec.quantization or ("nf4-dq" if spec.method == "qlora" else "none")


def resolve_training(
    hyper: Hyperparameters, peft: PeftConfigSpec, n_examples: int, seed: int, method: TrainingMethod = "supervised"
) -> ResolvedTraining:
    """Turn every `"auto"` into a number chosen from the dataset size, and fill the method's defaults.

    For a dpo job `n_examples` counts pairs, and `hyper` is its `DpoHyperparameters`.
    """
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
    base_rate = METHOD_BASE_LEARNING_RATES.get(peft.method, BASE_LEARNING_RATE)
    if method == "dpo":
        base_rate *= DPO_LEARNING_RATE_FACTOR
    learning_rate = peft.learning_rate or base_rate * multiplier
    steps = math.ceil(n / batch_size) * n_epochs
    if peft.max_steps is not None:
        steps = min(steps, peft.max_steps)
    return ResolvedTraining(
        n_epochs=n_epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        learning_rate_multiplier=multiplier,
        seed=seed,
        peft=_with_method_defaults(peft, steps),
        quantization=resolved_quantization(peft),
        lora_alpha=peft.alpha or 2.0 * peft.r,
        expected_steps=steps,
        method=method,
        beta=_resolved_beta(hyper) if method == "dpo" else None,
    )


def _resolved_beta(hyper: Hyperparameters) -> float:
    beta = getattr(hyper, "beta", "auto")
    return DEFAULT_DPO_BETA if beta == "auto" else float(beta)


def _with_method_defaults(peft: PeftConfigSpec, steps: int) -> PeftConfigSpec:
    """The spec with its method's object present and complete, and packing decided."""
    update: dict = {"packing": peft.packing if peft.packing is not None else peft.method not in PROMPT_LEARNING}
    if peft.method == "adalora":
        adalora = peft.adalora or AdaLoraSpec()
        tinit = adalora.tinit if adalora.tinit is not None else steps // 10
        tfinal = adalora.tfinal if adalora.tfinal is not None else steps // 5
        update["adalora"] = adalora.model_copy(update={
            "init_r": adalora.init_r or max(peft.r, math.ceil(1.5 * peft.r)), "tinit": tinit, "tfinal": tfinal,
        })
    elif peft.method == "ia3":
        update["ia3"] = peft.ia3 or Ia3Spec()
    elif peft.method in PROMPT_LEARNING:
        update["prompt"] = peft.prompt or PromptSpec()
    elif peft.method == "bottleneck_adapter":
        update["bottleneck"] = peft.bottleneck or BottleneckSpec()
    return peft.model_copy(update=update)


TECHNIQUES = ("sparse", "layer_drop", "layerwise_lr_decay")


def techniques_of(peft: dict) -> dict:
    """The techniques a (resolved, JSON) peft spec uses, by name, with their settings."""
    return {name: peft[name] for name in TECHNIQUES if peft.get(name) is not None}
