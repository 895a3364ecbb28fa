"""Rebuild a trained model from its published artifact folder, and probe logits to prove it matches.

`load_trained_model` works in a fresh process for every method: peft artifacts through
`worker.formats.peft_artifact`, bottleneck adapters through `methods.bottleneck_module`, plus the
sparse technique's deltas (`techniques.sparse_apply`) when the folder has `sparse_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel, PeftType

from core.schemas.peft_methods import SparseSpec
from worker.base_loading import load_base_model
from worker.device import DeviceChoice, choose_device
from worker.formats.bottleneck import PEFT_TYPE as BOTTLENECK_PEFT_TYPE
from worker.formats.files import ADAPTER_CONFIG_FILE
from worker.formats.peft_artifact import load_peft_artifact
from worker.formats.sparse_deltas import has_sparse_config, read_sparse_config
from worker.training.methods.bottleneck_module import load_bottleneck_adapters
from worker.training.model import evaluation_mode
from worker.training.techniques.sparse_apply import apply_sparse_deltas
from worker.training.techniques.sparse_selection import quantization_skip_modules

PROBE_POSITIONS = 16
PROBE_VOCAB_IDS = 64


def load_trained_model(
    base_model_path: str,
    adapter_dir: Path | str,
    *,
    quantization: str,
    device: DeviceChoice | torch.device | str | None = None,
    skip_modules: list[str] | None = None,
) -> torch.nn.Module:
    """The base model (quantized as in training) with the artifact in `adapter_dir` applied, in eval mode.

    Returns a `PeftModel` for peft artifacts, else the causal LM with bottleneck adapters hooked in.
    `device` defaults to CUDA (bf16) when available, else CPU (float32). `skip_modules` are the base
    linears training kept out of 4-bit (sparse top_k/modules); by default they are derived from the
    folder's `sparse_config.json`.
    """
    adapter_dir = Path(adapter_dir)
    device = choose_device(device)
    if skip_modules is None and quantization != "none":
        skip_modules = _sparse_skip_modules(adapter_dir, base_model_path)
    base = load_base_model(base_model_path, quantization, device, training=True, skip_modules=skip_modules)
    peft_type = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text()).get("peft_type")
    if peft_type == BOTTLENECK_PEFT_TYPE:
        load_bottleneck_adapters(base, adapter_dir, dtype=device.compute_dtype)
        model = base
    else:
        model = load_peft_artifact(base, adapter_dir)
    if has_sparse_config(adapter_dir):
        apply_sparse_deltas(model, adapter_dir)
    model.requires_grad_(False)
    model.eval()
    return model


def _sparse_skip_modules(adapter_dir: Path, base_model_path: str) -> list[str] | None:
    """The modules a sparse job kept in full precision on its 4-bit base, from `sparse_config.json`."""
    if not has_sparse_config(adapter_dir):
        return None
    config = read_sparse_config(adapter_dir)
    return quantization_skip_modules(SparseSpec(kind=config["kind"], modules=config.get("modules")), base_model_path)


def _virtual_tokens_in_logits(model: torch.nn.Module) -> int:
    if isinstance(model, PeftModel):
        config = model.active_peft_config
        if config.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):
            return config.num_virtual_tokens
    return 0


@torch.no_grad()
def probe_logits(model: torch.nn.Module, input_ids: torch.Tensor | list[int]) -> torch.Tensor:
    """Full float32 logits (batch, length, vocab) of `model` on `input_ids` in eval mode, computed as
    training computes them; prompt/P-tuning's virtual-token positions are stripped."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    device = next(model.parameters()).device
    ids = ids.to(device)
    with evaluation_mode(model):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return logits[:, _virtual_tokens_in_logits(model):].float()


def probe_record(model: torch.nn.Module, input_ids: list[int]) -> dict:
    """A JSON-able fingerprint of `model`: logits at the first 16 positions of `input_ids` for 64 vocab
    ids spread evenly over the vocabulary, and the full-vocabulary argmax at each position."""
    ids = list(input_ids[:PROBE_POSITIONS])
    logits = probe_logits(model, ids)[0]
    vocab = logits.shape[-1]
    vocab_ids = torch.linspace(0, vocab - 1, PROBE_VOCAB_IDS).round().long()
    return {
        "input_ids": ids,
        "vocab_ids": vocab_ids.tolist(),
        "logits": logits[:, vocab_ids.to(logits.device)].cpu().tolist(),
        "argmax": logits.argmax(dim=-1).cpu().tolist(),
    }
