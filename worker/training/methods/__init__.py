"""Attach the job's fine-tuning method (peft.method) to a loaded causal LM."""

from __future__ import annotations

import torch
from peft import get_peft_model
from torch import nn

from core.schemas.training import ResolvedTraining
from worker.training.fused_lora import use_fused_lora
from worker.training.methods.base import AttachedMethod, count_params
from worker.training.methods.bottleneck_method import BottleneckMethod
from worker.training.methods.bottleneck_module import attach_bottleneck_adapters, config_for_model
from worker.training.methods.peft_configs import peft_config_for
from worker.training.methods.peft_methods import AdaLoraMethod, PeftMethod

__all__ = ["AttachedMethod", "attach_method"]


def attach_method(
    causal_lm: nn.Module, config: ResolvedTraining, *, base_model_path: str, total_steps: int,
    adapter_dtype: torch.dtype,
) -> AttachedMethod:
    """Wrap or hook `causal_lm` with the job's method; only the method's parameters train afterwards.

    `total_steps` is the run's real number of optimizer steps (AdaLoRA's budget schedule);
    `adapter_dtype` is the dtype of our own adapters (the compute dtype). Set the random seed before
    calling: adapters start from random weights.
    """
    base_params = count_params(causal_lm)
    method = config.peft.method
    if method == "bottleneck_adapter":
        spec = config.peft.bottleneck
        causal_lm.requires_grad_(False)
        adapters = attach_bottleneck_adapters(
            causal_lm,
            config_for_model(causal_lm, bottleneck_size=spec.size, placement=spec.placement,
                             activation=spec.activation, scaling=spec.scaling,
                             base_model_name_or_path=base_model_path),
            dtype=adapter_dtype,
        )
        return BottleneckMethod(causal_lm, adapters, base_params)
    peft_config = peft_config_for(config, causal_lm, base_model_path=base_model_path, total_steps=total_steps)
    model = get_peft_model(causal_lm, peft_config)
    use_fused_lora(model)
    wrapper = AdaLoraMethod if method == "adalora" else PeftMethod
    return wrapper(method, model, base_params)
