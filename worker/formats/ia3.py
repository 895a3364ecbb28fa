"""PEFT IA3: written and reloaded by peft (see `peft_artifact`); read for serving as one gain vector per linear.

peft 0.21.2 (`tuners/ia3/layer.py`): a feedforward module scales its input, y = W (l * x) + b; any
other target module scales its output, bias included, y = l * (W x + b). A module is feedforward
when a `feedforward_modules` entry ends its name (or, given as one string, fully matches it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from worker.formats.files import AdapterLoadError, check_finite

_IA3_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.ia3_l(?:\.[^.]+)?$")


@dataclass(frozen=True)
class Ia3Gain:
    """One linear's IA3 vector: multiplies its input features (feedforward) or its output features."""

    gain: torch.Tensor  # [in_features] when on_input, else [out_features]
    on_input: bool


def read_ia3_gains(
    config: dict, tensors: Mapping[str, torch.Tensor], linear_shapes: Mapping[str, tuple[int, int]]
) -> dict[str, Ia3Gain]:
    """The IA3 gains per target module name, checked against the base's linears."""
    if config.get("modules_to_save"):
        raise AdapterLoadError("modules_to_save (fully trained copies of modules) is not supported for serving")
    if config.get("fan_in_fan_out"):
        raise AdapterLoadError("fan_in_fan_out (Conv1D) layers are not supported for serving")
    feedforward = config.get("feedforward_modules") or []
    gains = {}
    for key, tensor in tensors.items():
        match = _IA3_KEY.match(key)
        if match is None:
            raise AdapterLoadError(f"unexpected tensor {key!r} in an IA3 adapter (only ia3_l vectors are served)")
        name = match["module"]
        if name not in linear_shapes:
            raise AdapterLoadError(f"unknown target module {name!r}: the base model has no such linear layer")
        in_features, out_features = linear_shapes[name]
        on_input = _is_feedforward(feedforward, name)
        expected = (1, in_features) if on_input else (out_features, 1)
        if tuple(tensor.shape) != expected:
            where = "feedforward (input)" if on_input else "output"
            raise AdapterLoadError(
                f"module {name!r}: ia3_l has shape {tuple(tensor.shape)}, but an {where} gain of this base linear "
                f"({in_features} -> {out_features}) is {expected}"
            )
        check_finite(f"module {name!r}", tensor)
        gains[name] = Ia3Gain(gain=tensor.float().flatten(), on_input=on_input)
    if not gains:
        raise AdapterLoadError("the IA3 adapter holds no ia3_l vectors")
    return gains


def _is_feedforward(feedforward: str | list[str], name: str) -> bool:
    """peft's `_check_target_module_feedforward`."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(key) for key in feedforward)
