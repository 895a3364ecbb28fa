"""Load a base model folder (safetensors only, never remote code) for training or for serving.

Quantization "nf4-dq" (NF4 with double quantization) or "nf4" turns every linear but the head
(and any `skip_modules`) into a bitsandbytes 4-bit layer computing in the device's compute dtype;
"none" keeps the whole model in that dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from worker.device import DeviceChoice


def quantization_config(
    quantization: str, compute_dtype: torch.dtype, skip_modules: list[str] | None = None
) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for "nf4-dq" (NF4 + double quantization) or "nf4"; None for "none".

    `skip_modules` (module names kept in full precision) replaces transformers' default skips.
    """
    if quantization == "none":
        return None
    if quantization not in ("nf4-dq", "nf4"):
        raise ValueError(f"unknown quantization {quantization!r}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=quantization == "nf4-dq",
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip_modules,
    )


def load_tokenizer(model_dir: Path | str) -> PreTrainedTokenizerBase:
    """The model folder's tokenizer (no remote code)."""
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def load_base_model(
    model_dir: Path | str,
    quantization: str,
    device: DeviceChoice,
    *,
    training: bool,
    skip_modules: list[str] | None = None,
) -> PreTrainedModel:
    """The causal LM of the folder on `device`, quantized as asked (except `skip_modules`).

    `training=True`: as training sees it, without the KV cache and, when 4-bit, frozen and prepared
    for k-bit training (non-quantized weights upcast; checkpointing is set by the caller).
    `training=False`: as serving sees it, in eval mode with every parameter frozen.
    """
    quant = quantization_config(quantization, device.compute_dtype, skip_modules)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=device.compute_dtype,
        quantization_config=quant,
        device_map={"": device.device} if quant is not None else None,
        trust_remote_code=False,
        use_safetensors=True,
    )
    if quant is None:
        model.to(device.device)
    if not training:
        model.eval()
        model.requires_grad_(False)
        return model
    model.config.use_cache = False
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model
