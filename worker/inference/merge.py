"""Merged serving for a dedicated deployment: fold one LoRA adapter into a full-precision base.

W += scaling * B @ A on every target linear, leaving no LoRA modules, so the model runs at base
latency. Merging into a 4-bit base would round the update away, so only full precision is merged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from worker.base_loading import load_base_model, load_tokenizer
from worker.device import choose_device
from worker.formats.files import AdapterLoadError
from worker.formats.lora import LoraAdapter, read_lora_adapter
from worker.inference.lora_slots import dora_gain, target_linear_names


@torch.no_grad()
def merge_lora_into(model: nn.Module, adapter_dir: Path | str) -> LoraAdapter:
    """Add the adapter's `scaling * B @ A` to each target linear's weight, in place; return the adapter read."""
    names = target_linear_names(model)
    linears = {name: model.get_submodule(name) for name in names}
    for name, linear in linears.items():
        if type(linear) is not nn.Linear or linear.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise AdapterLoadError(
                f"cannot merge into {name!r} ({type(linear).__name__}): load the base in full precision"
            )
    adapter = read_lora_adapter(adapter_dir, {n: (m.in_features, m.out_features) for n, m in linears.items()})
    for name, weights in adapter.modules.items():
        weight = linears[name].weight
        delta = (weights.lora_B.double() @ weights.lora_A.double()) * weights.scaling
        merged = weight.double() + delta.to(weight.device)
        if weights.magnitude is not None:  # DoRA rescales each output row of the adapted weight
            merged = merged * dora_gain(weight.detach().double(), weights).unsqueeze(1).to(merged)
        weight.copy_(merged.to(weight.dtype))
    return adapter


def load_merged_model(
    model_dir: Path | str, adapter_dir: Path | str, device: torch.device | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base in full precision (fp32 on CPU, bf16 on CUDA) with the adapter merged in."""
    model = load_base_model(model_dir, "none", choose_device(device), training=False)
    tokenizer = load_tokenizer(model_dir)
    merge_lora_into(model, adapter_dir)
    return model, tokenizer


def save_merged_model(model_dir: Path | str, adapter_dir: Path | str, dest: Path | str) -> Path:
    """Write base + merged adapter as a safetensors model folder (with the tokenizer) that serves like a base."""
    model, tokenizer = load_merged_model(model_dir, adapter_dir, device="cpu")
    dest = Path(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest
