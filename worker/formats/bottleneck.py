"""Bottleneck adapters (Houlsby-style, our own format `patchbay.bottleneck/v1`; peft has no such method).

After the output h of a decoder layer's `self_attn` ("attention") and/or `mlp` module, before the
residual add, an adapter computes h' = h + scaling * up(act(down(h))).

Files: `adapter_config.json` (see `BottleneckConfig`, with peft_type BOTTLENECK_ADAPTER) and
`adapter_model.safetensors` with keys `layers.{i}.{attention|mlp}.{down|up}.{weight|bias}`.
- Written by training: `write_bottleneck_folder` (through
  `worker.training.methods.bottleneck_module.save_bottleneck_adapters`, which owns the `nn.Module`).
- Read for a training reload: `read_bottleneck_folder` (checked on its own), then hooked into a model by
  `bottleneck_module.load_bottleneck_adapters`.
- Read for serving: `read_bottleneck` (checked against the served base's width and depth).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from worker.formats.files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterLoadError, check_finite

PEFT_TYPE = "BOTTLENECK_ADAPTER"
FORMAT = "patchbay.bottleneck/v1"
PLACEMENTS = ("attention", "mlp")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckFormatError(ValueError):
    """A bottleneck adapter folder or config is malformed, or does not fit the model."""


@dataclass(frozen=True)
class BottleneckConfig:
    """What `adapter_config.json` holds for a bottleneck adapter."""

    bottleneck_size: int
    placement: tuple[str, ...]
    activation: str
    scaling: float
    hidden_size: int
    num_layers: int
    base_model_name_or_path: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1:
            problems.append(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if not self.placement or any(p not in PLACEMENTS for p in self.placement) or (
            len(set(self.placement)) != len(self.placement)
        ):
            problems.append(f"placement must be a non-empty subset of {list(PLACEMENTS)}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not isinstance(self.scaling, int | float) or not self.scaling > 0:
            problems.append(f"scaling must be a positive number, got {self.scaling!r}")
        for name in ("hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if problems:
            raise BottleneckFormatError("invalid bottleneck adapter config: " + "; ".join(problems))

    def to_json(self) -> dict:
        """The `adapter_config.json` content."""
        data = asdict(self)
        data["placement"] = list(self.placement)
        data["scaling"] = float(self.scaling)
        return {"peft_type": PEFT_TYPE, "format": FORMAT, **data}

    @classmethod
    def from_json(cls, data: dict) -> BottleneckConfig:
        """Parse and validate an `adapter_config.json` dict."""
        if data.get("peft_type") != PEFT_TYPE or data.get("format") != FORMAT:
            raise BottleneckFormatError(
                f"not a bottleneck adapter config: peft_type {data.get('peft_type')!r}, format {data.get('format')!r} "
                f"(expected {PEFT_TYPE!r}, {FORMAT!r})"
            )
        fields = ("bottleneck_size", "placement", "activation", "scaling", "hidden_size", "num_layers")
        missing = [name for name in fields if name not in data]
        if missing:
            raise BottleneckFormatError(f"bottleneck adapter config lacks {missing}")
        placement = data["placement"]
        if not isinstance(placement, list):
            raise BottleneckFormatError(f"placement must be a list, got {placement!r}")
        return cls(
            bottleneck_size=data["bottleneck_size"],
            placement=tuple(placement),
            activation=data["activation"],
            scaling=data["scaling"],
            hidden_size=data["hidden_size"],
            num_layers=data["num_layers"],
            base_model_name_or_path=str(data.get("base_model_name_or_path") or ""),
        )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor key of `adapter_model.safetensors` and its shape."""
        b, d = self.bottleneck_size, self.hidden_size
        shapes = {}
        for i in range(self.num_layers):
            for place in self.placement:
                prefix = f"layers.{i}.{place}"
                shapes.update({f"{prefix}.down.weight": (b, d), f"{prefix}.down.bias": (b,),
                               f"{prefix}.up.weight": (d, b), f"{prefix}.up.bias": (d,)})
        return shapes


def write_bottleneck_folder(folder: Path, config: BottleneckConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (the given tensors) into `folder`; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(tensors, folder / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2))
    return folder


def read_bottleneck_folder(folder: Path) -> tuple[BottleneckConfig, dict[str, torch.Tensor]]:
    """Read and validate a bottleneck adapter folder: its config and its tensors (on CPU)."""
    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise BottleneckFormatError(f"bottleneck adapter folder {folder} lacks {path.name}")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise BottleneckFormatError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BottleneckFormatError(f"{config_path} must hold a JSON object")
    config = BottleneckConfig.from_json(data)
    tensors = load_file(weights_path)
    expected = config.expected_shapes()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise BottleneckFormatError(
            f"{weights_path.name} does not match its config: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise BottleneckFormatError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
        if not tensor.is_floating_point():
            raise BottleneckFormatError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    return config, tensors


# ---- serving -----------------------------------------------------------------------------------


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
    activation: str  # a key of `ACTIVATIONS`
    scaling: float


def activation_module(name: str) -> nn.Module:
    """The activation the training side uses for `name` (e.g. exact GELU for "gelu")."""
    return ACTIVATIONS[name]()


def read_bottleneck(folder: Path, hidden_size: int, num_layers: int) -> BottleneckAdapter:
    """Read the folder with `read_bottleneck_folder` and check it against the served base's width and depth."""
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
