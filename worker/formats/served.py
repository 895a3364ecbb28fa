"""Read any servable artifact folder into the terms the inference slots apply, dispatching on its `peft_type`.

Kinds: LORA (DoRA with use_dora) and ADALORA become LoRA factors; IA3 gains; LOHA, LOKR and HRA dense
weight deltas (full-precision servers only: they were trained on, and HRA multiplies, the dense base
weights); PROMPT_TUNING and P_TUNING virtual tokens; PREFIX_TUNING prefix keys/values;
BOTTLENECK_ADAPTER blocks. Sparse deltas (`sparse_config.json`) may sit beside any of them and are
added to the base linears (y = base(x) + x dW^T + db); on a 4-bit server the base part stays 4-bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.formats.adalora import read_adalora_modules
from worker.formats.bottleneck import BottleneckAdapter, read_bottleneck
from worker.formats.files import AdapterLoadError, peft_type_of, read_config_json, read_safetensors
from worker.formats.ia3 import Ia3Gain, read_ia3_gains
from worker.formats.lora import LoraModuleWeights, read_lora_adapter
from worker.formats.prompt_learning import (
    PROMPT_TYPES,
    AttentionShape,
    PrefixKV,
    VirtualTokens,
    read_prompt_learning,
)
from worker.formats.sparse_deltas import DenseDelta, has_any_sparse_file, read_served_sparse_deltas
from worker.formats.weight_deltas import WEIGHT_DELTA_TYPES, read_weight_deltas

SERVED_TYPES = ("LORA", "ADALORA", "IA3", *WEIGHT_DELTA_TYPES, *PROMPT_TYPES, "BOTTLENECK_ADAPTER")


@dataclass(frozen=True)
class BaseLayout:
    """What adapter readers check against: the served base's linears, attention shape and limits."""

    linear_shapes: dict[str, tuple[int, int]]  # (in_features, out_features) by module name
    linear_has_bias: dict[str, bool]
    full_weight: Callable[[str], torch.Tensor]  # a linear's weight in float32 (dequantized if 4-bit)
    attention: AttentionShape
    quantization: str
    max_rank: int


@dataclass(frozen=True)
class ServedAdapter:
    """Every term one adapter adds to the base; most kinds fill one or two of them."""

    path: Path
    kind: str  # e.g. "lora", "dora", "ia3", "prefix_tuning", "lora+sparse"
    lora: dict[str, LoraModuleWeights] = field(default_factory=dict)
    ia3: dict[str, Ia3Gain] = field(default_factory=dict)
    deltas: dict[str, DenseDelta] = field(default_factory=dict)
    bottleneck: BottleneckAdapter | None = None
    prompt: VirtualTokens | PrefixKV | None = None

    @property
    def rank(self) -> int | None:
        """The largest LoRA rank, None for kinds without LoRA factors."""
        return max((w.rank for w in self.lora.values()), default=None)

    @property
    def virtual_tokens(self) -> int:
        """Positions the adapter adds before every prompt (prompt learning), else 0."""
        return 0 if self.prompt is None else self.prompt.count


def read_served_adapter(folder: Path | str, base: BaseLayout) -> ServedAdapter:
    """Read and validate any servable artifact against `base` (raises `AdapterLoadError`)."""
    folder = Path(folder)
    config = read_config_json(folder)
    peft_type = peft_type_of(config)
    if peft_type not in SERVED_TYPES:
        raise AdapterLoadError(
            f"peft_type {peft_type or 'missing'!r} is not supported; served kinds: {', '.join(SERVED_TYPES)}"
        )
    if peft_type in WEIGHT_DELTA_TYPES and base.quantization != "none":
        raise AdapterLoadError(
            f"{peft_type} adapters change the dense base weights and need a full-precision base; this server runs "
            f"a {base.quantization} base (serve them with quantization 'none')"
        )
    sparse = (read_served_sparse_deltas(folder, base.linear_shapes, base.linear_has_bias)
              if has_any_sparse_file(folder) else {})
    kind = _kind_name(peft_type, config) + ("+sparse" if sparse else "")
    if peft_type == "LORA":
        lora = read_lora_adapter(folder, base.linear_shapes, base.max_rank).modules
        return ServedAdapter(folder, kind, lora=lora, deltas=sparse)
    tensors = read_safetensors(folder)
    if peft_type == "ADALORA":
        lora = read_adalora_modules(config, tensors, base.linear_shapes, base.max_rank)
        return ServedAdapter(folder, kind, lora=lora, deltas=sparse)
    if peft_type == "IA3":
        return ServedAdapter(folder, kind, ia3=read_ia3_gains(config, tensors, base.linear_shapes), deltas=sparse)
    if peft_type in WEIGHT_DELTA_TYPES:
        return ServedAdapter(folder, kind, deltas=_with_method_deltas(folder, peft_type, tensors, base, sparse))
    if peft_type in PROMPT_TYPES:
        prompt = read_prompt_learning(peft_type, config, tensors, base.attention)
        return ServedAdapter(folder, kind, prompt=prompt, deltas=sparse)
    bottleneck = read_bottleneck(folder, base.attention.hidden_size, base.attention.num_layers)
    return ServedAdapter(folder, kind, bottleneck=bottleneck, deltas=sparse)


def _kind_name(peft_type: str, config: dict) -> str:
    if peft_type == "LORA" and config.get("use_dora"):
        return "dora"
    return peft_type.lower()


def _with_method_deltas(
    folder: Path, peft_type: str, tensors: Mapping[str, torch.Tensor], base: BaseLayout,
    sparse: dict[str, DenseDelta],
) -> dict[str, DenseDelta]:
    """LoHa/LoKr/HRA deltas computed on the base as the sparse deltas changed it, plus those sparse deltas."""

    def trained_weight(name: str) -> torch.Tensor:
        weight = base.full_weight(name)
        sparse_weight = sparse[name].weight if name in sparse else None
        return weight if sparse_weight is None else weight + sparse_weight

    method = read_weight_deltas(folder, peft_type, tensors, base.linear_shapes, trained_weight)
    combined = dict(sparse)
    for name, delta in method.items():
        previous = sparse.get(name)
        weight = delta if previous is None or previous.weight is None else delta + previous.weight
        combined[name] = DenseDelta(weight=weight, bias=None if previous is None else previous.bias)
    return combined
