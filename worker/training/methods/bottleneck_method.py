"""The bottleneck adapter method: our own adapters hooked into a frozen causal LM."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from worker.training.methods.base import AttachedMethod
from worker.training.methods.bottleneck_module import (
    BottleneckAdapters,
    read_matching_weights,
    save_bottleneck_adapters,
)


class BottleneckMethod(AttachedMethod):
    """`model` is the causal LM itself; only its `patchbay_bottleneck` adapters train."""

    def __init__(self, causal_lm: nn.Module, adapters: BottleneckAdapters, base_params: int) -> None:
        super().__init__("bottleneck_adapter", causal_lm, causal_lm, base_params)
        self.adapters = adapters

    def save(self, folder: Path) -> Path:
        """`adapter_config.json` (format patchbay.bottleneck/v1) and `adapter_model.safetensors`."""
        return save_bottleneck_adapters(self.adapters, folder)

    def load_adapter_weights(self, folder: Path) -> None:
        """Copy a saved artifact of the same config into the adapters (refuses any other)."""
        saved = read_matching_weights(self.adapters, Path(folder))
        self._check_artifact_fits(saved, self.adapters.state_dict())
        self.adapters.load_state_dict(saved, strict=True)
