"""Find the parts of a causal LM: the model under a peft wrapper, its decoder layers and their base
linears, and whether a linear is a bitsandbytes 4-bit layer. Shared by training and inference."""

from __future__ import annotations

import torch


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM itself, under a peft wrapper if there is one."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks (e.g. a Llama's `model.layers`) of a causal LM or a peft model around one.

    Raises `ValueError` when the model has no decoder or its decoder no `layers` list.
    """
    causal_lm = unwrap_causal_lm(model)
    get_decoder = getattr(causal_lm, "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if callable(get_decoder) else None
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(causal_lm).__name__}")
    return layers


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every base linear of the decoder layers by qualified name relative to the causal LM
    (e.g. `model.layers.0.mlp.down_proj`), 4-bit ones included.

    Inside a peft tuner layer only its `base_layer` is visited, and the name is the one the base
    model had (without `.base_layer`), so adapter linears (lora_A, ...) never appear.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    causal_lm = unwrap_causal_lm(model)
    layers = decoder_layers(causal_lm)
    prefix = next(name for name, module in causal_lm.named_modules() if module is layers)
    found: dict[str, torch.nn.Linear] = {}

    def visit(module: torch.nn.Module, name: str) -> None:
        if isinstance(module, BaseTunerLayer):
            visit(module.get_base_layer(), name)
        elif isinstance(module, torch.nn.Linear):
            found[name] = module
        else:
            for child_name, child in module.named_children():
                visit(child, f"{name}.{child_name}")

    for index, layer in enumerate(layers):
        visit(layer, f"{prefix}.{index}")
    return found


def is_4bit(linear: torch.nn.Module) -> bool:
    """Whether a linear is a bitsandbytes 4-bit `Linear4bit` (its weight packed, with a quant state)."""
    weight = getattr(linear, "weight", None)
    return getattr(weight, "quant_state", None) is not None or type(linear).__name__ == "Linear4bit"
