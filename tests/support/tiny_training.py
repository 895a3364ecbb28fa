"""Small training helpers for technique tests: load the tiny model, make batches, run optimizer steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def load_tiny(
    model_dir: Path, *, quantization: str = "none", skip_modules: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
):
    """The tiny causal LM on CPU (float32 unless asked), frozen, in training mode; NF4 (+double quant)
    if asked."""
    quant = None
    if quantization != "none":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=quantization == "nf4-dq",
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=skip_modules,
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, quantization_config=quant,
        device_map={"": "cpu"} if quant is not None else None, use_safetensors=True,
    )
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.train()


def token_batches(n: int, *, vocab: int = 1000, length: int = 12, seed: int = 0) -> list[torch.Tensor]:
    """`n` fixed [2, length] batches of token ids below `vocab`."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (2, length), generator=generator) for _ in range(n)]


def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the batch on itself."""
    return model(input_ids=input_ids, labels=input_ids).loss


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[torch.Tensor],
    *,
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """One optimizer step per batch (two micro-batches each, as the recipe accumulates); the losses."""
    losses = []
    for batch in batches:
        loss = sum(lm_loss(model, half) / 2 for half in batch.split(1))
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Full logits of a batch (no gradient)."""
    return model(input_ids=input_ids).logits
