"""The bottleneck adapter as a module of the training model: the `nn.Module`, hooking it into a causal LM,
and saving/reloading it (the files themselves are `worker.formats.bottleneck`).

Adapters are attached with forward hooks, so the base model's code and weights (4-bit or full
precision) stay untouched. `up` starts at zero, so an untrained adapter is the identity.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from worker.formats.bottleneck import (
    ACTIVATIONS,
    BottleneckConfig,
    BottleneckFormatError,
    read_bottleneck_folder,
    write_bottleneck_folder,
)
from worker.model_parts import decoder_layers

_HOOKED_MODULE = {"attention": "self_attn", "mlp": "mlp"}


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
    try:
        return decoder_layers(causal_lm)
    except ValueError as exc:
        raise BottleneckFormatError(str(exc)) from None


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
    """Write the adapters' artifact (`adapter_config.json`, `adapter_model.safetensors`) into `folder`; return it."""
    return write_bottleneck_folder(folder, adapters.config, adapters.state_dict())


def read_matching_weights(adapters: BottleneckAdapters, folder: Path) -> dict[str, torch.Tensor]:
    """The weights saved in `folder`, refused unless their config is that of `adapters` (base path aside)."""
    config, tensors = read_bottleneck_folder(folder)
    if replace(config, base_model_name_or_path="") != replace(adapters.config, base_model_name_or_path=""):
        raise BottleneckFormatError(f"the saved adapter is {config}, this job's is {adapters.config}")
    return tensors


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
