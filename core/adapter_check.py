"""Check a PEFT LoRA folder against a base model, from headers and configs alone (no torch)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from core.safetensors_header import SafetensorsError, read_folder_shapes, read_shapes, shape_numel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SUPPORTED_PEFT_TYPES = ("LORA",)
# PEFT key of one LoRA tensor: `base_model.model.<module>.lora_A.weight` (an adapter name may sit before `weight`).
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


class AdapterCheckError(ValueError):
    """An adapter that cannot serve on the given base; `check` names the failed check."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check


@dataclass
class AdapterSummary:
    """What the checks learned about the adapter."""

    peft_type: str
    rank: int
    alpha: float
    target_modules: list[str]
    trainable_params: int


def _target_names(config: dict) -> list[str]:
    targets = config.get("target_modules") or []
    return sorted(targets) if isinstance(targets, list) else [str(targets)]


def check_adapter_folder(folder: Path, base_dir: Path, max_rank: int) -> AdapterSummary:
    """Run every check; raise AdapterCheckError on the first that fails."""
    pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise AdapterCheckError(
            "format", f"pickle files are refused ({', '.join(pickles)}); only safetensors is accepted")
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file():
        raise AdapterCheckError("format", "adapter_config.json is missing")
    if not weights_path.is_file():
        raise AdapterCheckError("format", "adapter_model.safetensors is missing")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterCheckError("format", "adapter_config.json is not valid JSON") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise AdapterCheckError("method", f"peft_type {peft_type or 'missing'!r} is not supported; expected LORA")
    rank = int(config.get("r") or 0)
    if not 1 <= rank <= max_rank:
        raise AdapterCheckError("rank", f"rank r={rank} is outside the allowed range 1..{max_rank}")
    try:
        adapter = read_shapes(weights_path)
        base = read_folder_shapes(base_dir)
    except SafetensorsError as exc:
        raise AdapterCheckError("format", str(exc)) from None
    base_config = json.loads((base_dir / "config.json").read_text())
    params = 0
    lora_modules = set()
    for key, shape in adapter.items():
        params += shape_numel(shape)
        match = LORA_KEY.match(key)
        if match is None:
            _check_vocab(key, shape, base_config)
            continue
        module, part = match["module"], match["part"]
        lora_modules.add(module)
        base_shape = base.get(f"{module}.weight")
        if base_shape is None:
            raise AdapterCheckError("target_modules", f"target module '{module}' does not exist in the base model")
        out_features, in_features = base_shape[0], base_shape[-1]
        expected = [rank_of(shape, part), in_features] if part == "A" else [out_features, rank_of(shape, part)]
        if shape != expected:
            raise AdapterCheckError(
                "shapes", f"{key} has shape {shape}, but the base module '{module}' is {out_features}x{in_features}")
        if rank_of(shape, part) > max_rank:
            raise AdapterCheckError("rank", f"{key} has rank {rank_of(shape, part)}, over the limit {max_rank}")
    if not lora_modules:
        raise AdapterCheckError("format", "adapter_model.safetensors holds no LoRA weights")
    return AdapterSummary(peft_type=peft_type, rank=rank, alpha=float(config.get("lora_alpha") or rank),
                          target_modules=_target_names(config), trainable_params=params)


def rank_of(shape: list[int], part: str) -> int:
    """The LoRA rank a lora_A ([r, in]) or lora_B ([out, r]) shape implies."""
    return shape[0] if part == "A" else shape[-1]


def _check_vocab(key: str, shape: list[int], base_config: dict) -> None:
    vocab = base_config.get("vocab_size")
    if ("embed_tokens" in key or "lm_head" in key) and vocab and shape and shape[0] != vocab:
        raise AdapterCheckError("vocabulary", f"{key} has a vocabulary of {shape[0]}, but the base has {vocab}")
