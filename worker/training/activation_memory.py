"""`gradient_checkpointing: "auto"`: checkpoint when a row's activations would not comfortably fit.

Activation checkpointing trades speed for memory (on SmolLM2-135M, CPU: 27% slower, 1.7 GB less at
peak; `bench/train_throughput.py`), so it only wins where the activations would otherwise crowd the
machine. The choice is measured, not guessed per model name: one short probe forward records how
many bytes of activations autograd keeps per token for this model, method and device; times the
recipe's largest row, plus the loss's logits chunk, that is the estimate. Checkpointing turns on when
the estimate exceeds `AUTO_SHARE` of the memory available to the device (MemAvailable on CPU, free
memory on CUDA).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from worker.training.model import modes_restored

AUTO_SHARE = 0.5
"""Checkpoint when the estimated activations exceed this share of the available memory."""
PROBE_TOKENS = 64
_GB = 1024**3


@dataclass(frozen=True)
class CheckpointingChoice:
    """The decision for one job and what it rests on."""

    enabled: bool
    bytes_per_token: float
    row_tokens: int
    estimate_bytes: int
    available_bytes: int

    def message(self) -> str:
        """The job event's text."""
        state = "on" if self.enabled else "off"
        relation = "more" if self.enabled else "no more"
        return (f"activation checkpointing {state} (auto): a row of {self.row_tokens} tokens keeps about "
                f"{self.estimate_bytes / _GB:.2f} GB of activations, {relation} than {AUTO_SHARE:.0%} of the "
                f"{self.available_bytes / _GB:.1f} GB available")

    def data(self) -> dict:
        """The job event's data."""
        return {"gradient_checkpointing": self.enabled, "activation_bytes_per_token": round(self.bytes_per_token),
                "row_tokens": self.row_tokens, "estimated_activation_bytes": self.estimate_bytes,
                "available_bytes": self.available_bytes}


def available_memory_bytes(device: torch.device) -> int:
    """Memory a training run on `device` may still take: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def activation_bytes_per_token(model: nn.Module, decoder: nn.Module, device: torch.device, vocab_size: int) -> float:
    """Bytes of tensors autograd keeps for backward, per token, in a training-mode forward of `decoder`.

    Parameters (which autograd also saves) are not counted. The probe runs in training mode and leaves
    the random state and every module's mode as they were, so it changes nothing about the run that follows."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def record(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), _training_mode(model):
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, vocab_size, (1, PROBE_TOKENS), generator=generator).to(device)
        with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
            hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        del hidden
    return sum(seen.values()) / PROBE_TOKENS


@contextmanager
def _training_mode(model: nn.Module) -> Iterator[None]:
    """Every module in training mode (dropout on; bitsandbytes' 4-bit layers must never run a forward in eval
    mode here, see `worker.training.model.evaluation_mode`), then each back to its own mode."""
    with modes_restored(model):
        model.train()
        yield


def loss_chunk_bytes(chunk_tokens: int | None, row_tokens: int, vocab_size: int, element_size: int) -> int:
    """The chunked loss's transient logits: about three [chunk, vocab] fp32 buffers (one in the compute dtype)."""
    rows = row_tokens if chunk_tokens is None else min(chunk_tokens, row_tokens)
    return rows * vocab_size * (2 * 4 + element_size)


def choose_checkpointing(
    model: nn.Module, decoder: nn.Module, device: torch.device, *, row_tokens: int, vocab_size: int,
    chunk_tokens: int | None, available_bytes: int | None = None,
) -> CheckpointingChoice:
    """Measure this model's activations per token and decide for rows of up to `row_tokens` tokens."""
    per_token = activation_bytes_per_token(model, decoder, device, vocab_size)
    element_size = next(decoder.parameters()).element_size()
    estimate = int(per_token * row_tokens) + loss_chunk_bytes(chunk_tokens, row_tokens, vocab_size, element_size)
    available = available_memory_bytes(device) if available_bytes is None else available_bytes
    return CheckpointingChoice(estimate > AUTO_SHARE * available, per_token, row_tokens, estimate, available)
