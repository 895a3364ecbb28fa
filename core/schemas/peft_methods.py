"""Per-method and per-technique parameter objects of the `peft` extension, with their defaults.

Each object is used only by the methods named in its docstring; `PeftConfigSpec` refuses an object
given for a method that ignores it, so that a typo in a spec never passes silently.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.schemas.bounds import MAX_STEPS, ModuleList

PeftMethod = Literal[
    "qlora", "lora", "dora", "adalora", "loha", "lokr", "hra",
    "ia3", "prefix_tuning", "prompt_tuning", "p_tuning", "bottleneck_adapter",
]
LORA_FAMILY = ("qlora", "lora", "dora", "adalora")
"""Methods whose artifact is low-rank factors: served in mixed batches from LoRA slots."""
WEIGHT_DELTA_METHODS = ("loha", "lokr", "hra")
"""peft methods that rewrite each target weight; they have no bitsandbytes 4-bit layers."""
PROMPT_LEARNING = ("prefix_tuning", "prompt_tuning", "p_tuning")
"""Methods that learn virtual tokens (input embeddings, or per-layer keys and values)."""
RANKED_METHODS = LORA_FAMILY + WEIGHT_DELTA_METHODS
"""Methods that take `r`, `alpha`, `dropout` and `target_modules`."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AdaLoraSpec(_Strict):
    """AdaLoRA's budget schedule (method `adalora`); `peft.r` is the final average rank it prunes to."""

    init_r: int | None = Field(None, ge=1, le=256, description="starting rank per module; defaults to 1.5*r")
    tinit: int | None = Field(None, ge=0, le=MAX_STEPS,
                              description="warm-up steps before pruning; defaults to 10% of steps")
    tfinal: int | None = Field(None, ge=0, le=MAX_STEPS,
                               description="final fine-tuning steps at the target budget; defaults to 20%")
    delta_t: int = Field(1, ge=1, le=MAX_STEPS, description="steps between two budget allocations")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0, le=1000, description="weight of the orthogonality regularizer of P and Q")


class Ia3Spec(_Strict):
    """IA3's rescaled activations (method `ia3`); both lists default to peft's choice for the architecture."""

    target_modules: ModuleList | None = Field(None, min_length=1, description="modules whose activations are scaled")
    feedforward_modules: ModuleList | None = Field(
        None, description="the subset of target_modules whose input (not output) is scaled"
    )


class PromptSpec(_Strict):
    """Virtual tokens (methods `prefix_tuning`, `prompt_tuning`, `p_tuning`)."""

    num_virtual_tokens: int = Field(20, ge=1, le=512)
    init_text: str | None = Field(
        None, min_length=1, max_length=4000, description="prompt_tuning only: initialise from this text's embeddings"
    )
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="p_tuning only: the prompt encoder")
    encoder_hidden_size: int | None = Field(
        None, ge=1, le=16384, description="p_tuning's encoder width, or prefix_tuning's projection width"
    )
    prefix_projection: bool = Field(False, description="prefix_tuning only: reparameterise through an MLP")


class BottleneckSpec(_Strict):
    """Classic (Houlsby-style) adapters (method `bottleneck_adapter`)."""

    size: int = Field(64, ge=1, le=8192, description="the bottleneck width")
    placement: list[Literal["attention", "mlp"]] = Field(
        default_factory=lambda: ["attention", "mlp"], min_length=1, description="blocks followed by an adapter"
    )
    activation: Literal["relu", "gelu", "silu", "tanh"] = "gelu"
    scaling: float = Field(1.0, gt=0, le=100, description="multiplies the adapter's output")


class SparseSpec(_Strict):
    """Sparse fine-tuning of the base's own decoder linears, trained beside the method's adapter.

    - `bitfit`: only biases (zero-initialised where a linear has none);
    - `modules`: every weight and bias of the named modules or layers (`modules` required);
    - `top_k`: the `density` share of entries with the largest gradient magnitude after
      `warmup_steps`, searched in `modules` (default: every decoder linear).
    """

    kind: Literal["bitfit", "modules", "top_k"]
    modules: ModuleList | None = Field(
        None, min_length=1, description="module or layer names or suffixes, e.g. 'layers.3' or 'mlp.down_proj'"
    )
    density: float = Field(0.01, gt=0, le=1, description="top_k only: the share of candidate entries that train")
    warmup_steps: int = Field(4, ge=1, le=1000, description="top_k only: steps of gradient statistics")
