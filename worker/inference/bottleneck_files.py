"""Read a bottleneck adapter folder (`patchbay.bottleneck/v1`, our own format; peft has no such method).

The format, its validation and the math come from `worker.bottleneck` (the training side): after the
output h of a decoder layer's `self_attn` ("attention") and/or `mlp` module, before the residual add,
h' = h + scaling * up(act(down(h))). Here the folder is also checked against the served base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from worker.bottleneck import ACTIVATIONS, BottleneckFormatError, read_bottleneck_folder
from worker.inference.adapter_files import AdapterLoadError, check_finite


@dataclass(frozen=True)
class BottleneckBlock:
    """One down/up projection pair, inserted after one module of one decoder layer."""

    down_weight: torch.Tensor  # [b, d]
    down_bias: torch.Tensor  # [b]
    up_weight: torch.Tensor  # [d, b]
    up_bias: torch.Tensor  # [d]


@dataclass(frozen=True)
class BottleneckAdapter:
    """Every block of one bottleneck adapter, by (layer index, placement), and how they compute."""

    blocks: dict[tuple[int, str], BottleneckBlock]
    activation: str  # a key of `worker.bottleneck.ACTIVATIONS`
    scaling: float


def activation_module(name: str) -> nn.Module:
    """The activation the training side uses for `name` (e.g. exact GELU for "gelu")."""
    return ACTIVATIONS[name]()


def read_bottleneck(folder: Path, hidden_size: int, num_layers: int) -> BottleneckAdapter:
    """Read the folder with the training side's reader and check it against the base's width and depth."""
    try:
        config, tensors = read_bottleneck_folder(folder)
    except BottleneckFormatError as exc:
        raise AdapterLoadError(f"bottleneck adapter: {exc}") from exc
    if config.hidden_size != hidden_size or config.num_layers != num_layers:
        raise AdapterLoadError(
            f"the bottleneck adapter is for hidden_size={config.hidden_size}, num_layers={config.num_layers}; "
            f"this base has {hidden_size} and {num_layers}"
        )
    blocks = {}
    for layer in range(num_layers):
        for where in config.placement:
            prefix = f"layers.{layer}.{where}"
            parts = [tensors[f"{prefix}.{part}"] for part in ("down.weight", "down.bias", "up.weight", "up.bias")]
            check_finite(f"bottleneck block {prefix!r}", *parts)
            blocks[layer, where] = BottleneckBlock(*(part.float() for part in parts))
    return BottleneckAdapter(blocks=blocks, activation=config.activation, scaling=float(config.scaling))
