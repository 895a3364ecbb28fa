"""Optimizer parameter groups, with layer-wise learning-rate decay (LLRD) when asked.

With decay d and L decoder layers, a parameter of layer l trains at lr * d^(L-1-l): the last layer at
lr, the first at lr * d^(L-1), so the layers nearest the input move least. Parameters before the first
layer (input embeddings, prompt learning's virtual tokens and prompt/prefix encoders) count as layer -1
(lr * d^L); parameters after the last layer (final norm, lm_head) train at lr.

Each group keeps `param_names` (torch optimizers accept them; the checkpoint code records them) and
`layer` (-1, 0..L-1, or None after the last layer). An LR scheduler such as transformers' LambdaLR
scales every group's initial lr by the same factor, so the ratios hold throughout training.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

import torch

from worker.model_parts import decoder_layers, unwrap_causal_lm

BEFORE_FIRST_LAYER = -1
_VIRTUAL_TOKEN_MARKERS = ("prompt_encoder",)  # peft's prompt learning: PeftModel.prompt_encoder.<adapter>
_LAYER_IN_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_indices(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], model: torch.nn.Module
) -> dict[str, int | None]:
    """Each parameter's layer: its decoder layer's index, -1 before the first layer, None after the last.

    A parameter belongs to a layer when it lives in that layer's module (peft adapters included), or
    else when its name contains `layers.<i>.` (for adapters kept outside the layer modules).
    """
    layers = decoder_layers(model)
    layer_of = {id(p): index for index, layer in enumerate(layers) for p in layer.parameters()}
    embeddings = unwrap_causal_lm(model).get_input_embeddings()
    before = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    indices: dict[str, int | None] = {}
    for name, param in named_params:
        if id(param) in layer_of:
            indices[name] = layer_of[id(param)]
        elif id(param) in before or any(marker in name for marker in _VIRTUAL_TOKEN_MARKERS):
            indices[name] = BEFORE_FIRST_LAYER
        elif (match := _LAYER_IN_NAME.search(name)) and int(match[1]) < len(layers):
            indices[name] = int(match[1])
        else:
            indices[name] = None
    return indices


def optimizer_param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    decay: float | None = None,
    without_weight_decay: Collection[torch.nn.Parameter] = (),
) -> list[dict]:
    """Param groups for a torch optimizer: by layer when `decay` is set (lr * decay^(L-1-l)), and
    `without_weight_decay` (compared by identity) in groups of weight decay 0.

    Groups come in layer order (-1, 0, ..., L-1, then after the last layer); the parameters keep the
    given order within a group. The optimizer's parameter order is `group_param_names(groups)`.
    """
    named_params = list(named_params)
    n_layers = len(decoder_layers(model))
    layers = layer_indices(named_params, model) if decay is not None else {}
    no_decay = {id(p) for p in without_weight_decay}
    groups: dict[tuple, dict] = {}
    for name, param in named_params:
        layer = layers.get(name)
        decays = weight_decay > 0 and id(param) not in no_decay
        key = (n_layers if layer is None else layer, not decays)
        group = groups.get(key)
        if group is None:
            scale = 1.0 if layer is None else decay ** (n_layers - 1 - layer)
            group = groups[key] = {"params": [], "param_names": [], "lr": lr * scale,
                                   "weight_decay": weight_decay if decays else 0.0, "layer": layer}
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def group_param_names(groups: Iterable[dict]) -> list[str]:
    """The parameter names in the order the optimizer indexes them (group by group)."""
    return [name for group in groups for name in group["param_names"]]
