"""What every adapter folder shares: its two file names, reading them (safetensors only), the readers' error."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.adapter_check import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE

ADAPTER_CONFIG_FILE = CONFIG_FILE  # the names `core.adapter_check` checks uploads by
ADAPTER_WEIGHTS_FILE = WEIGHTS_FILE


class AdapterLoadError(Exception):
    """An adapter folder cannot be served; the message names the problem."""


def read_config_json(folder: Path, name: str = ADAPTER_CONFIG_FILE) -> dict:
    """The JSON object in `folder/name` (raises `AdapterLoadError` when missing or malformed)."""
    if not folder.is_dir():
        raise AdapterLoadError(f"adapter folder {folder} does not exist")
    path = folder / name
    if not path.is_file():
        raise AdapterLoadError(f"{name} is missing from {folder}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{name} must hold a JSON object")
    return config


def peft_type_of(config: dict) -> str:
    """The config's `peft_type`, upper-cased ("" when absent)."""
    return str(config.get("peft_type") or "").upper()


def read_safetensors(folder: Path, name: str = ADAPTER_WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    """Every tensor of `folder/name` on the CPU; pickle files are never loaded (their presence is named)."""
    path = folder / name
    if not path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterLoadError(
                f"only {name} is loaded; found {', '.join(pickles)} (pickle files are refused)"
            )
        raise AdapterLoadError(f"{name} is missing from {folder}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot read {name}: {exc}") from exc


def check_finite(what: str, *tensors: torch.Tensor) -> None:
    """Raise `AdapterLoadError` when any of the tensors holds NaN or infinity."""
    for tensor in tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterLoadError(f"{what}: weights contain NaN or infinity")
