"""The bottleneck adapter method: our own adapters hooked into a frozen causal LM."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from worker.training.methods.base import AttachedMethod
from worker.training.methods.bottleneck_module import BottleneckAdapters, save_bottleneck_adapters


class BottleneckMethod(AttachedMethod):
    """`model` is the causal LM itself; only its `patchbay_bottleneck` adapters train."""

    def __init__(self, causal_lm: nn.Module, adapters: BottleneckAdapters, base_params: int) -> None:
        super().__init__("bottleneck_adapter", causal_lm, causal_lm, base_params)
        self.adapters = adapters

    def save(self, folder: Path) -> Path:
        """`adapter_config.json` (format patchbay.bottleneck/v1) and `adapter_model.safetensors`."""
        return save_bottleneck_adapters(self.adapters, folder)
