"""Load a base causal LM for serving: 4-bit NF4 with double quantization, or full precision."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

QUANTIZATIONS = ("nf4-dq", "none")


def serving_device(device: torch.device | str | None = None) -> torch.device:
    """The given device, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype_for(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, float32 on CPU (bf16 matmuls are slower on CPUs without bf16 instructions)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_base_model(
    model_dir: Path | str, quantization: str, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the safetensors model folder once, in eval mode, with its tokenizer; never runs remote code.

    "nf4-dq": every linear but the head becomes a bitsandbytes 4-bit NF4 layer with double
    quantization, computing in the device's compute dtype; "none": the whole model in that dtype.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
    dtype = compute_dtype_for(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if quantization == "nf4-dq":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            quantization_config=quant,
            device_map={"": device},
            trust_remote_code=False,
            use_safetensors=True,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, trust_remote_code=False, use_safetensors=True
        ).to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
