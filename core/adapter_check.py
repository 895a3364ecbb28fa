"""Check a PEFT LoRA folder against a base model, from headers and configs alone (no torch).

Check names (the API reports `adapter_<check>`): `format` (files missing or unreadable, pickles, bad safetensors,
no/unpaired/non-float/unknown tensors), `method` (peft_type), `rank` (r, rank_pattern, tensor ranks),
`config` (other adapter_config.json values), `target_modules` (the field, or modules the base lacks),
`shapes` (factors that do not fit the base module), `vocabulary` (embedding/lm_head rows).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.safetensors_header import (
    FLOAT_DTYPES,
    SafetensorsError,
    TensorInfo,
    read_folder_shapes,
    read_header,
    shape_numel,
    shown,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SUPPORTED_PEFT_TYPES = ("LORA",)
# PEFT key of one LoRA tensor: `base_model.model.<module>.lora_A.weight` (an adapter name may sit before `weight`).
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1024 * 1024
MAX_ALPHA = 1e6
# rank_pattern/alpha_pattern keys are module-name suffixes. PEFT reads them as regexes; refusing regex syntax keeps
# that reading identical to a plain suffix match and rules out malformed or catastrophically slow patterns.
_PATTERN_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,256}$")


class AdapterCheckError(ValueError):
    """An adapter that cannot serve on the given base; `check` names the failed check."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check

    def __reduce__(self):
        return type(self), (self.check, str(self))


@dataclass
class AdapterSummary:
    """What the checks learned about the adapter."""

    peft_type: str
    rank: int
    alpha: float
    target_modules: list[str]
    trainable_params: int


@dataclass(frozen=True)
class LoraSettings:
    """The validated adapter_config.json fields the tensor checks need (rank_pattern: module suffix -> rank)."""

    peft_type: str
    rank: int
    alpha: float
    target_modules: list[str]
    rank_pattern: dict[str, int] = field(default_factory=dict)


def check_adapter_folder(folder: Path, base_dir: Path, max_rank: int) -> AdapterSummary:
    """Run every check; raise AdapterCheckError on the first that fails.

    The base folder is trusted: a broken base raises SafetensorsError or OSError, not AdapterCheckError.
    """
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterCheckError(
            "format", f"pickle files are refused ({', '.join(pickles)}); only safetensors is accepted")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterCheckError("format", f"{CONFIG_FILE} is missing")
    if not weights_path.is_file():
        raise AdapterCheckError("format", f"{WEIGHTS_FILE} is missing")
    settings = lora_settings(read_adapter_config(config_path), max_rank)
    try:
        tensors = read_header(weights_path).tensors
    except SafetensorsError as exc:
        raise AdapterCheckError("format", str(exc)) from None
    base_shapes = read_folder_shapes(base_dir)
    base_config = json.loads((base_dir / "config.json").read_text())
    factors: dict[str, dict[str, tuple[str, TensorInfo]]] = {}
    for key, info in tensors.items():
        match = LORA_KEY.match(key)
        if match is None:
            _check_vocab_tensor(key, info, base_config)
            continue
        parts = factors.setdefault(match["module"], {})
        if match["part"] in parts:
            raise AdapterCheckError("format", f"module {shown(match['module'])} has two lora_{match['part']} tensors")
        parts[match["part"]] = (key, info)
    if not factors:
        raise AdapterCheckError("format", f"{WEIGHTS_FILE} holds no LoRA weights")
    for module, parts in sorted(factors.items()):
        _check_module(module, parts, settings, base_shapes)
    return AdapterSummary(peft_type=settings.peft_type, rank=settings.rank, alpha=settings.alpha,
                          target_modules=settings.target_modules,
                          trainable_params=sum(shape_numel(info.shape) for info in tensors.values()))


def read_adapter_config(path: Path) -> dict:
    """The JSON object in adapter_config.json; AdapterCheckError `format` when too large or not a JSON object."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterCheckError("format", f"{CONFIG_FILE} is too large ({size} bytes, limit {MAX_CONFIG_BYTES})")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise AdapterCheckError("format", f"{CONFIG_FILE} is not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterCheckError("format", f"{CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterCheckError("format", f"{CONFIG_FILE} must hold a JSON object")
    return config


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def lora_settings(config: dict, max_rank: int) -> LoraSettings:
    """Validate the LoRA fields of an adapter config (method, rank, config and target_modules checks)."""
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() not in SUPPORTED_PEFT_TYPES:
        raise AdapterCheckError("method", f"peft_type {shown(str(peft_type or 'missing'))} is not supported; "
                                          "expected LORA")
    rank = config.get("r")
    if not _is_int(rank):
        raise AdapterCheckError("rank", f"rank r must be an integer, not {shown(json.dumps(rank))}")
    if not 1 <= rank <= max_rank:
        raise AdapterCheckError("rank", f"rank r={rank} is outside the allowed range 1..{max_rank}")
    alpha = config.get("lora_alpha")
    alpha = rank if alpha is None else _alpha_value("lora_alpha", alpha)
    dropout = config.get("lora_dropout")
    if dropout is not None and not (_is_number(dropout) and math.isfinite(dropout) and 0 <= dropout < 1):
        raise AdapterCheckError("config", f"lora_dropout must be a number in [0, 1), not {shown(json.dumps(dropout))}")
    rank_pattern = _pattern("rank_pattern", config.get("rank_pattern"))
    for key, value in rank_pattern.items():
        if not _is_int(value) or not 1 <= value <= max_rank:
            raise AdapterCheckError(
                "rank", f"rank_pattern[{shown(key)}]={shown(json.dumps(value))} is not a rank in 1..{max_rank}")
    for key, value in _pattern("alpha_pattern", config.get("alpha_pattern")).items():
        _alpha_value(f"alpha_pattern[{shown(key)}]", value)
    return LoraSettings(peft_type=peft_type.upper(), rank=rank, alpha=float(alpha),
                         target_modules=_target_names(config.get("target_modules")), rank_pattern=rank_pattern)


def _alpha_value(what: str, value: object) -> float:
    if not (_is_number(value) and math.isfinite(value) and 0 < value <= MAX_ALPHA):
        raise AdapterCheckError(
            "config", f"{what} must be a finite number in (0, {MAX_ALPHA:g}], not {shown(json.dumps(value))}")
    return float(value)


def _pattern(what: str, patterns: object) -> dict:
    if patterns is None:
        return {}
    if not isinstance(patterns, dict):
        raise AdapterCheckError("config", f"{what} must be an object mapping module names to values")
    for key in patterns:
        if not _PATTERN_KEY.match(key):
            raise AdapterCheckError(
                "config", f"{what} key {shown(key)} must be a module name suffix (letters, digits, '_', '.', '-')")
    return patterns


def _target_names(targets: object) -> list[str]:
    if isinstance(targets, str) and targets:
        return [targets]
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        return sorted(targets)
    raise AdapterCheckError("target_modules", "target_modules must be a non-empty string or list of module names")


def _configured_rank(settings: LoraSettings, module: str) -> int:
    """PEFT's rank_pattern lookup: the first key that matches the module name or a dotted suffix of it."""
    for key, value in settings.rank_pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return settings.rank


def rank_of(shape: list[int] | tuple[int, ...], part: str) -> int:
    """The LoRA rank a lora_A ([r, in]) or lora_B ([out, r]) shape implies."""
    return shape[0] if part == "A" else shape[-1]


def _check_module(module: str, parts: dict[str, tuple[str, TensorInfo]], settings: LoraSettings,
                  base_shapes: dict[str, list[int]]) -> None:
    for part, other in (("A", "B"), ("B", "A")):
        if part in parts and other not in parts:
            raise AdapterCheckError("format", f"module {shown(module)} has lora_{part} but no lora_{other}")
    for key, info in parts.values():
        if info.dtype not in FLOAT_DTYPES:
            raise AdapterCheckError(
                "format", f"{shown(key)} has dtype {info.dtype}; LoRA weights must be floating point")
        if len(info.shape) != 2:
            raise AdapterCheckError("shapes", f"{shown(key)} has shape {list(info.shape)}; LoRA factors are matrices")
    base_shape = base_shapes.get(f"{module}.weight")
    if base_shape is None:
        raise AdapterCheckError("target_modules", f"target module {shown(module)} does not exist in the base model")
    if len(base_shape) != 2:
        raise AdapterCheckError("target_modules", f"target module {shown(module)} is not a linear layer of the base")
    out_features, in_features = base_shape
    expected_rank = _configured_rank(settings, module)
    for part, (key, info) in sorted(parts.items()):
        if rank_of(info.shape, part) != expected_rank:
            raise AdapterCheckError("rank", f"{shown(key)} has rank {rank_of(info.shape, part)}, but {CONFIG_FILE} "
                                            f"says r={expected_rank} for {shown(module)}")
    for part, (key, info) in sorted(parts.items()):
        expected = [expected_rank, in_features] if part == "A" else [out_features, expected_rank]
        if list(info.shape) != expected:
            raise AdapterCheckError("shapes", f"{shown(key)} has shape {list(info.shape)}, but the base module "
                                              f"{shown(module)} is {out_features}x{in_features}")


def _check_vocab_tensor(key: str, info: TensorInfo, base_config: dict) -> None:
    """A full embed_tokens/lm_head replacement must fit the base's vocabulary and width; other keys are refused."""
    if "embed_tokens" not in key and "lm_head" not in key:
        raise AdapterCheckError("format", f"unexpected tensor {shown(key)} in {WEIGHTS_FILE} "
                                          "(only LoRA factors and embed_tokens/lm_head weights are accepted)")
    if info.dtype not in FLOAT_DTYPES:
        raise AdapterCheckError("format", f"{shown(key)} has dtype {info.dtype}; weights must be floating point")
    text_config = base_config.get("text_config") or {}
    vocab = base_config.get("vocab_size") or text_config.get("vocab_size")
    hidden = base_config.get("hidden_size") or text_config.get("hidden_size")
    if len(info.shape) != 2:
        raise AdapterCheckError("shapes", f"{shown(key)} has shape {list(info.shape)}; expected [vocabulary, hidden]")
    if vocab and info.shape[0] != vocab:
        raise AdapterCheckError(
            "vocabulary", f"{shown(key)} has a vocabulary of {info.shape[0]}, but the base has {vocab}")
    if hidden and info.shape[1] != hidden:
        raise AdapterCheckError(
            "shapes", f"{shown(key)} has shape {list(info.shape)}, but the base hidden size is {hidden}")
