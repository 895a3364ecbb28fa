"""All adapter slots of one served model: per-linear terms, bottleneck blocks and prompt-learning state.

A slot holds one adapter of any kind. Every kind but prefix tuning applies per batch row inside the
one shared forward (`route`), so rows of different adapters and kinds share prefill and decode
batches; prefix-tuning rows are prefilled per adapter (their cache starts with the prefix) and then
decode with everyone else. See `worker.formats.served` for the kinds and `lora_slots` for the per-row math.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from worker.formats.files import AdapterLoadError
from worker.formats.prompt_learning import AttentionShape
from worker.formats.served import BaseLayout, ServedAdapter, read_served_adapter
from worker.inference.bottleneck_slots import BottleneckSlots
from worker.inference.cpu_threads import on_short_lived_thread
from worker.inference.lora_bank import LoraSlotBank, RowRouting
from worker.inference.lora_slots import dense_weight, install_lora_slots
from worker.inference.prompt_slots import PromptSlots


class AdapterSlots:
    """Reads adapters of any kind, writes them into slots, and routes batch rows to slots."""

    def __init__(self, model: nn.Module, linears: LoraSlotBank, quantization: str) -> None:
        self.linears = linears
        self.n_slots = linears.n_slots
        self.blocks = BottleneckSlots(model, linears)
        self.prompts = PromptSlots(linears.device, linears.dtype)
        self.layout = _base_layout(model, linears, quantization)
        self._generations = [0] * self.n_slots  # bumped whenever a slot's content changes

    @property
    def strategy(self) -> str:
        """The batched LoRA kernel strategy (see `lora_slots`)."""
        return self.linears.strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        self.linears.strategy = value

    def read_adapter(self, folder: Path | str) -> ServedAdapter:
        """Read and validate an artifact folder for these slots (raises `AdapterLoadError`).

        Like `write_slot` and `clear_slot`, it runs its torch work on a short-lived thread, whatever thread
        calls it: see `worker.inference.cpu_threads`.
        """
        return on_short_lived_thread(lambda: self._read_adapter(folder), "adapter-read")

    def _read_adapter(self, folder: Path | str) -> ServedAdapter:
        adapter = read_served_adapter(folder, self.layout)
        if adapter.bottleneck is not None and not self.blocks.supported:
            raise AdapterLoadError("bottleneck adapters need decoder layers with `self_attn` and `mlp` modules")
        return adapter

    def write_slot(self, slot: int, adapter: ServedAdapter) -> None:
        """Copy a validated adapter into `slot`; the slot must not be routed to while this runs."""
        on_short_lived_thread(lambda: self._write_slot(slot, adapter), "adapter-write")

    def _write_slot(self, slot: int, adapter: ServedAdapter) -> None:
        self._generations[slot] += 1
        self.blocks.write_slot(slot, adapter.bottleneck)
        self.prompts.write_slot(slot, adapter.prompt)
        self.linears.write_linear_terms(slot, adapter.lora, adapter.ia3, adapter.deltas,
                                        block_terms=adapter.bottleneck is not None)

    def load_slot(self, slot: int, folder: Path | str) -> ServedAdapter:
        """Read, validate and copy the adapter in `folder` into `slot`."""
        adapter = self.read_adapter(folder)
        self.write_slot(slot, adapter)
        return adapter

    def clear_slot(self, slot: int) -> None:
        """Empty `slot` so that it contributes nothing."""
        on_short_lived_thread(lambda: self._clear_slot(slot), "adapter-clear")

    def _clear_slot(self, slot: int) -> None:
        self._generations[slot] += 1
        self.linears.clear_slot(slot)
        self.blocks.write_slot(slot, None)
        self.prompts.write_slot(slot, None)

    def owner(self, slot: int | None) -> tuple[int, int] | None:
        """Who computes a row's keys and values: None for the base, else the slot and what it holds now.

        Stored prefixes are keyed by it (`worker.inference.prefix_cache`), so an adapter written into a
        slot never sees the keys and values of the one that held it before.
        """
        return None if slot is None else (slot, self._generations[slot])

    @contextmanager
    def route(self, row_slots: Sequence[int | None]) -> Iterator[RowRouting]:
        """Within this block, batch row i of every forward uses slot `row_slots[i]` (None: the base)."""
        with self.linears.route(row_slots) as routing:
            yield routing


def install_adapter_slots(
    model: nn.Module, n_slots: int, max_rank: int, dtype: torch.dtype, quantization: str
) -> AdapterSlots:
    """Wrap the model's decoder linears and hook its blocks so that it serves `n_slots` adapters of any kind."""
    return AdapterSlots(model, install_lora_slots(model, n_slots, max_rank, dtype), quantization)


def _base_layout(model: nn.Module, linears: LoraSlotBank, quantization: str) -> BaseLayout:
    config = model.config
    heads = config.num_attention_heads
    attention = AttentionShape(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )
    layers = linears.layers
    return BaseLayout(
        linear_shapes=linears.linear_shapes(),
        linear_has_bias={name: layer.base_layer.bias is not None for name, layer in layers.items()},
        full_weight=lambda name: dense_weight(layers[name].base_layer).cpu(),
        attention=attention,
        quantization=quantization,
        max_rank=linears.max_rank,
    )
