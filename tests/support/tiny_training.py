"""Small training helpers for technique tests: load the tiny model, make batches, run optimizer steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from worker.base_loading import load_base_model
from worker.device import DeviceChoice


def load_tiny(
    model_dir: Path, *, quantization: str = "none", skip_modules: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
):
    """The tiny causal LM loaded as training loads it, on CPU (float32 unless asked; NF4 (+double quant)
    if asked), frozen, in training mode."""
    device = DeviceChoice(torch.device("cpu"), dtype)
    model = load_base_model(model_dir, quantization, device, training=True, skip_modules=skip_modules)
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
