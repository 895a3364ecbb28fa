"""PEFT LoRA (and DoRA, `use_dora`): written and reloaded by peft (see `peft_artifact`); read for serving here.

Files: `adapter_config.json` (peft's LoraConfig) and `adapter_model.safetensors` with
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] per target linear
(DoRA adds `.lora_magnitude_vector` [out]). Serving reads them as delta W = scaling * B @ A, checked
against the base's linears; options that compute more than that are refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from core.adapter_check import LORA_KEY
from worker.formats.files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterLoadError,
    check_finite,
    peft_type_of,
    read_config_json,
    read_safetensors,
)

# DoRA's per-output magnitude: `base_model.model.<module>.lora_magnitude_vector` (maybe `.<adapter>.weight`).
_MAGNITUDE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")

# Config fields that change what the adapter computes beyond W x + s * B A x: served only when unset.
_UNSUPPORTED_FIELDS = {
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "lora_bias": "LoRA with a bias (lora_bias)",
    "modules_to_save": "modules_to_save (fully trained copies of modules)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
}
# Initialisations that rewrite the base weights: the adapter alone is meaningless on the original base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class LoraModuleWeights:
    """One target linear's LoRA factors: delta W = scaling * lora_B @ lora_A (DoRA adds a magnitude)."""

    lora_A: torch.Tensor  # [rank, in_features]
    lora_B: torch.Tensor  # [out_features, rank]
    scaling: float
    magnitude: torch.Tensor | None = None  # [out_features], DoRA only

    @property
    def rank(self) -> int:
        """The LoRA rank r of this module."""
        return self.lora_A.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """A validated LoRA adapter: its factors per target module name (e.g. `model.layers.0.self_attn.q_proj`)."""

    path: Path
    modules: dict[str, LoraModuleWeights]

    @property
    def rank(self) -> int:
        """The largest rank over its modules."""
        return max((weights.rank for weights in self.modules.values()), default=0)


def read_lora_adapter(
    folder: Path | str, linear_shapes: Mapping[str, tuple[int, int]], max_rank: int | None = None
) -> LoraAdapter:
    """Read and validate a PEFT LoRA folder against the base's linears.

    `linear_shapes` maps each module name that may carry LoRA to its (in_features, out_features).
    Raises `AdapterLoadError` when the folder is not a plain LoRA in safetensors, names a module
    the base lacks, has shapes that do not fit, or a rank above `max_rank`.
    """
    folder = Path(folder)
    config = _read_config(folder)
    tensors = read_safetensors(folder)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        magnitude = _MAGNITUDE_KEY.match(key) if match is None and config.get("use_dora") else None
        if match is None and magnitude is None:
            raise AdapterLoadError(_unexpected_tensor_message(key))
        module, part = (match["module"], match["part"]) if match else (magnitude["module"], "magnitude")
        factors.setdefault(module, {})[part] = tensor
    if not factors:
        raise AdapterLoadError(f"{ADAPTER_WEIGHTS_FILE} holds no LoRA tensors")
    modules = {
        name: _check_module(name, parts, config, linear_shapes, max_rank) for name, parts in sorted(factors.items())
    }
    return LoraAdapter(path=folder, modules=modules)


def _read_config(folder: Path) -> dict:
    config = read_config_json(folder)
    peft_type = peft_type_of(config)
    if peft_type != "LORA":
        raise AdapterLoadError(f"{peft_type or 'unknown'} adapters are not supported for batched serving (LoRA only)")
    check_unsupported_lora_fields(config)
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or config[field] <= 0:
            raise AdapterLoadError(f"{ADAPTER_CONFIG_FILE} needs a positive {field!r}")
    return config


def check_unsupported_lora_fields(config: dict) -> None:
    """Refuse LoRA-family options that compute more than W x + s * B A x, or that rewrote the base weights."""
    for field, what in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise AdapterLoadError(f"{what} is not supported for batched serving")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterLoadError(
            f"init_lora_weights={init!r} changes the base weights; convert the adapter to plain LoRA before serving"
        )


def _unexpected_tensor_message(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return f"DoRA magnitude {key!r} found, but adapter_config.json does not set use_dora"
    if "lora_embedding" in key:
        return f"LoRA on embeddings ({key}) is not supported for batched serving"
    if ".lora_A." in key or ".lora_B." in key:
        return f"unsupported LoRA tensor {key!r} (only linear weights, no biases, are served)"
    return f"unexpected tensor {key!r} in {ADAPTER_WEIGHTS_FILE} (only LoRA factors of linear layers are served)"


def _pattern_value(patterns: Mapping[str, object] | None, module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches the module name or its dotted suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(default)


def _check_module(
    name: str,
    parts: dict[str, torch.Tensor],
    config: dict,
    linear_shapes: Mapping[str, tuple[int, int]],
    max_rank: int | None,
) -> LoraModuleWeights:
    if name not in linear_shapes:
        raise AdapterLoadError(f"unknown target module {name!r}: the base model has no such linear layer")
    needed = ("A", "B", "magnitude") if config.get("use_dora") else ("A", "B")
    missing = [f"lora_{part}" for part in needed if part not in parts]
    if missing:
        raise AdapterLoadError(f"module {name!r} lacks {' and '.join(missing)}")
    lora_a, lora_b = parts["A"], parts["B"]
    in_features, out_features = linear_shapes[name]
    if lora_a.ndim != 2 or lora_b.ndim != 2:
        raise AdapterLoadError(f"module {name!r}: lora_A and lora_B must be matrices")
    rank = lora_a.shape[0]
    if lora_a.shape[1] != in_features or lora_b.shape != (out_features, rank):
        raise AdapterLoadError(
            f"module {name!r}: shapes lora_A {tuple(lora_a.shape)}, lora_B {tuple(lora_b.shape)} do not fit "
            f"the base linear ({in_features} -> {out_features}); expected ({rank}, {in_features}) and "
            f"({out_features}, {rank}) — was the adapter trained on another base model?"
        )
    configured_rank = _pattern_value(config.get("rank_pattern"), name, config["r"])
    if rank != configured_rank:
        raise AdapterLoadError(f"module {name!r}: tensors have rank {rank} but the config says r={configured_rank:g}")
    if max_rank is not None and rank > max_rank:
        raise AdapterLoadError(f"module {name!r}: rank {rank} is above the server's max LoRA rank {max_rank}")
    check_finite(f"module {name!r}", lora_a, lora_b)
    magnitude = parts.get("magnitude")
    if magnitude is not None and (magnitude.shape != (out_features,) or not torch.isfinite(magnitude).all()):
        raise AdapterLoadError(f"module {name!r}: the DoRA magnitude must be {out_features} finite values")
    alpha = _pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraModuleWeights(lora_A=lora_a.float(), lora_B=lora_b.float(), scaling=scaling,
                             magnitude=None if magnitude is None else magnitude.float())
