"""Classic bottleneck adapters (Houlsby-style) for causal LMs: the module, attaching it, saving and loading it.

After the output h of each decoder layer's `self_attn` and/or `mlp` module (before the residual add),
an adapter computes `h + scaling * up(act(down(h)))`. `up` starts at zero, so an untrained adapter is
the identity. Adapters are attached with forward hooks, so the base model's code and weights (4-bit
or full precision) stay untouched.

Artifact folder (format `patchbay.bottleneck/v1`): `adapter_config.json` (see `BottleneckConfig`) and
`adapter_model.safetensors` with keys `layers.{i}.{attention|mlp}.{down|up}.{weight|bias}`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PEFT_TYPE = "BOTTLENECK_ADAPTER"
FORMAT = "patchbay.bottleneck/v1"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PLACEMENTS = ("attention", "mlp")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_HOOKED_MODULE = {"attention": "self_attn", "mlp": "mlp"}


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


class BottleneckAdapter(nn.Module):
    """h -> h + scaling * up(act(down(h))), computed in the adapter's own dtype."""

    def __init__(self, hidden_size: int, bottleneck_size: int, activation: str, scaling: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck_size, hidden_size)
        self.scaling = float(scaling)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The adapted hidden states, in the input's dtype."""
        delta = self.up(self.act(self.down(hidden.to(self.down.weight.dtype))))
        return hidden + (self.scaling * delta).to(hidden.dtype)


class BottleneckAdapters(nn.Module):
    """All adapters of one model, laid out as `layers[i][placement]` (the safetensors key layout)."""

    def __init__(self, config: BottleneckConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                place: BottleneckAdapter(config.hidden_size, config.bottleneck_size, config.activation, config.scaling)
                for place in config.placement
            })
            for _ in range(config.num_layers)
        )
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def detach_hooks(self) -> None:
        """Remove the forward hooks from the model (the adapters then have no effect)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


ATTRIBUTE = "patchbay_bottleneck"
"""The attribute of the causal LM holding its `BottleneckAdapters` (so .to(), train() and eval() reach them)."""


def _decoder_layers(causal_lm: nn.Module) -> nn.ModuleList:
    layers = getattr(causal_lm.get_decoder(), "layers", None)
    if layers is None:
        raise BottleneckFormatError(f"cannot find the decoder layers of {type(causal_lm).__name__}")
    return layers


def _attention_hook(adapter: BottleneckAdapter):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (adapter(output[0]),) + output[1:]
        return adapter(output)

    return hook


def _mlp_hook(adapter: BottleneckAdapter):
    def hook(module, args, output):
        return adapter(output)

    return hook


def attach_bottleneck_adapters(
    causal_lm: nn.Module, config: BottleneckConfig, *, dtype: torch.dtype, device: torch.device | None = None
) -> BottleneckAdapters:
    """Create adapters for every decoder layer of `causal_lm` and hook them in; returns them.

    The adapters are registered as `causal_lm.patchbay_bottleneck` and are trainable; the caller
    freezes the base. Attaching twice is refused.
    """
    if hasattr(causal_lm, ATTRIBUTE):
        raise BottleneckFormatError("this model already has bottleneck adapters attached")
    layers = _decoder_layers(causal_lm)
    hidden = causal_lm.config.get_text_config().hidden_size
    if config.num_layers != len(layers) or config.hidden_size != hidden:
        raise BottleneckFormatError(
            f"adapter is for {config.num_layers} layers of width {config.hidden_size}, but the model has "
            f"{len(layers)} layers of width {hidden}"
        )
    if device is None:
        device = causal_lm.get_input_embeddings().weight.device
    adapters = BottleneckAdapters(config).to(device=device, dtype=dtype)
    for layer, per_layer in zip(layers, adapters.layers):
        for place, adapter in per_layer.items():
            target = getattr(layer, _HOOKED_MODULE[place], None)
            if target is None:
                raise BottleneckFormatError(f"decoder layer {type(layer).__name__} has no `{_HOOKED_MODULE[place]}`")
            hook = _attention_hook(adapter) if place == "attention" else _mlp_hook(adapter)
            adapters._hooks.append(target.register_forward_hook(hook))
    causal_lm.add_module(ATTRIBUTE, adapters)
    return adapters


def config_for_model(
    causal_lm: nn.Module, *, bottleneck_size: int, placement: list[str], activation: str, scaling: float,
    base_model_name_or_path: str = "",
) -> BottleneckConfig:
    """A config sized for `causal_lm` (its hidden size and number of decoder layers)."""
    return BottleneckConfig(
        bottleneck_size=bottleneck_size,
        placement=tuple(placement),
        activation=activation,
        scaling=float(scaling),
        hidden_size=causal_lm.config.get_text_config().hidden_size,
        num_layers=len(_decoder_layers(causal_lm)),
        base_model_name_or_path=base_model_name_or_path,
    )


def save_bottleneck_adapters(adapters: BottleneckAdapters, folder: Path) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` into `folder`; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in adapters.state_dict().items()}
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(adapters.config.to_json(), indent=2))
    return folder


def read_bottleneck_folder(folder: Path) -> tuple[BottleneckConfig, dict[str, torch.Tensor]]:
    """Read and validate a bottleneck adapter folder: its config and its tensors (on CPU)."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
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


def load_bottleneck_adapters(
    causal_lm: nn.Module, folder: Path, *, dtype: torch.dtype | None = None
) -> BottleneckAdapters:
    """Attach the adapters saved in `folder` to `causal_lm` (frozen, eval mode); returns them.

    `dtype` defaults to the dtype of the model's input embeddings.
    """
    config, tensors = read_bottleneck_folder(folder)
    if dtype is None:
        dtype = causal_lm.get_input_embeddings().weight.dtype
    adapters = attach_bottleneck_adapters(causal_lm, config, dtype=dtype)
    adapters.load_state_dict(tensors, strict=True)
    adapters.requires_grad_(False)
    adapters.eval()
    return adapters
