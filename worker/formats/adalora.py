"""PEFT AdaLoRA: written and reloaded by peft (see `peft_artifact`); read for serving as plain LoRA factors,
so that AdaLoRA adapters join the LoRA slots.

peft 0.21.2 (`tuners/adalora/layer.py`, `SVDLinear.forward`) computes
    y = W x + (x @ (lora_A * lora_E).T @ lora_B.T) * scaling / (ranknum + 1e-5)
with `scaling = lora_alpha` (or the module's rank when lora_alpha <= 0) and `ranknum = init_r`.
ranknum is not saved: peft sets it to init_r when the layer is created, and
`resize_modules_by_rank_pattern` copies it unchanged when pruning to the saved `rank_pattern`.
So the equivalent LoRA factors are A' = E * A (E scales A's rows), B' = B, and
scaling' = scaling / (init_r + 1e-5). Modules pruned to rank 0 contribute nothing and are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from worker.formats.files import ADAPTER_CONFIG_FILE, AdapterLoadError, check_finite
from worker.formats.lora import LoraModuleWeights, check_unsupported_lora_fields

# `base_model.model.<module>.lora_A` (parameters: no `.weight`; an adapter name may follow the part).
_ADALORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[ABE])(?:\.[^.]+)?$")


def read_adalora_modules(
    config: dict,
    tensors: Mapping[str, torch.Tensor],
    linear_shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
) -> dict[str, LoraModuleWeights]:
    """AdaLoRA tensors converted to LoRA factors per target module (rank-0 modules left out)."""
    check_unsupported_lora_fields(config)
    if config.get("use_dora"):
        raise AdapterLoadError("AdaLoRA with use_dora is not supported")
    init_r = config.get("init_r")
    if not isinstance(init_r, int) or init_r <= 0:
        raise AdapterLoadError(f"{ADAPTER_CONFIG_FILE} of an AdaLoRA adapter needs a positive integer 'init_r'")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)):
        raise AdapterLoadError(f"{ADAPTER_CONFIG_FILE} of an AdaLoRA adapter needs a numeric 'lora_alpha'")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _ADALORA_KEY.match(key)
        if match is None:
            raise AdapterLoadError(f"unexpected tensor {key!r} in an AdaLoRA adapter (only lora_A/B/E are served)")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise AdapterLoadError("the AdaLoRA adapter holds no tensors")
    pattern = config.get("rank_pattern") or {}
    modules = {}
    for name, found in sorted(parts.items()):
        weights = _convert(name, found, linear_shapes, init_r, float(alpha), _kept_rank(pattern, name))
        if weights.rank > max_rank:
            raise AdapterLoadError(
                f"module {name!r}: rank {weights.rank} is above the server's max LoRA rank {max_rank}"
            )
        if weights.rank > 0:
            modules[name] = weights
    return modules


def _kept_rank(pattern: Mapping[str, object], module: str) -> int | None:
    """How many singular values `rank_pattern` keeps for the module (None when it does not name it)."""
    mask = pattern.get(f"{module}.lora_E", pattern.get(module))
    return None if mask is None else int(sum(bool(kept) for kept in mask))


def _convert(
    name: str,
    parts: dict[str, torch.Tensor],
    linear_shapes: Mapping[str, tuple[int, int]],
    init_r: int,
    alpha: float,
    kept_rank: int | None,
) -> LoraModuleWeights:
    if name not in linear_shapes:
        raise AdapterLoadError(f"unknown target module {name!r}: the base model has no such linear layer")
    missing = [f"lora_{part}" for part in "ABE" if part not in parts]
    if missing:
        raise AdapterLoadError(f"module {name!r} lacks {' and '.join(missing)}")
    lora_a, lora_b, lora_e = parts["A"], parts["B"], parts["E"]
    in_features, out_features = linear_shapes[name]
    rank = lora_a.shape[0] if lora_a.ndim == 2 else -1
    if (lora_a.shape != (rank, in_features) or lora_b.shape != (out_features, rank) or lora_e.shape != (rank, 1)):
        raise AdapterLoadError(
            f"module {name!r}: shapes lora_A {tuple(lora_a.shape)}, lora_B {tuple(lora_b.shape)}, lora_E "
            f"{tuple(lora_e.shape)} do not fit the base linear ({in_features} -> {out_features})"
        )
    if kept_rank is not None and kept_rank != rank:
        raise AdapterLoadError(f"module {name!r}: tensors have rank {rank} but rank_pattern keeps {kept_rank}")
    if rank > init_r:
        raise AdapterLoadError(f"module {name!r}: rank {rank} is above init_r={init_r}")
    check_finite(f"module {name!r}", lora_a, lora_b, lora_e)
    scaling = (alpha if alpha > 0 else float(rank)) / (init_r + 1e-5)
    return LoraModuleWeights(lora_A=(lora_a.float() * lora_e.float()), lora_B=lora_b.float(), scaling=scaling)
