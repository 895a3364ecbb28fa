"""PEFT LoHa, LoKr and HRA: written and reloaded by peft (see `peft_artifact`); read for serving here as
dense weight deltas of the base linears, materialized once at load.

Their updates are products (Hadamard, Kronecker, Householder) that do not split into per-row
low-rank factors, so each target linear gets a dense delta dW with y = W x + b + dW x. It is
computed by peft's own layers: the saved tensors are loaded into peft's modules wrapped around a
float64 copy of each base linear (weight W' = the full-precision W plus any sparse delta of the same
artifact, bias left out), and dW^T = peft_layer(I) - I @ W'^T. That covers HRA, whose forward is
multiplicative (x (W' R)^T), as exactly as the additive LoHa/LoKr.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from worker.formats.files import AdapterLoadError, check_finite

WEIGHT_DELTA_TYPES = ("LOHA", "LOKR", "HRA")
_ADAPTER = "default"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<param>(?:hada|lokr|hra)_[a-z0-9_]+?)(?:\.weight)?$")


def read_weight_deltas(
    folder: Path,
    peft_type: str,
    tensors: Mapping[str, torch.Tensor],
    linear_shapes: Mapping[str, tuple[int, int]],
    full_weight: Callable[[str], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The dense delta [out, in] (float32) per target module of a LoHa/LoKr/HRA folder.

    `full_weight(name)` returns the full-precision weight the adapter applies to (W' above).
    """
    from peft import PeftConfig, inject_adapter_in_model

    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterLoadError(f"unexpected tensor {key!r} in a {peft_type} adapter")
        if match["module"] not in linear_shapes:
            raise AdapterLoadError(f"unknown target module {match['module']!r}: the base has no such linear layer")
        check_finite(f"module {match['module']!r}", tensor)
        by_module.setdefault(match["module"], {})[match["param"]] = tensor
    if not by_module:
        raise AdapterLoadError(f"the {peft_type} adapter holds no tensors")
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except Exception as exc:  # peft raises several types for configs it cannot build
        raise AdapterLoadError(f"peft cannot read adapter_config.json: {exc}") from exc
    if getattr(config, "modules_to_save", None):
        raise AdapterLoadError("modules_to_save (fully trained copies of modules) is not supported for serving")
    config.target_modules = sorted(by_module)  # exactly what was saved, as full names
    config.inference_mode = True
    skeleton = _skeleton({name: full_weight(name) for name in by_module})
    try:
        inject_adapter_in_model(config, skeleton, adapter_name=_ADAPTER)
    except Exception as exc:
        raise AdapterLoadError(f"peft cannot build the {config.peft_type} layers on this base: {exc}") from exc
    skeleton.to(torch.float64).eval()
    deltas = {}
    with torch.no_grad():
        for name, params in by_module.items():
            layer = skeleton.get_submodule(name)
            _load_params(name, layer, params)
            weight = layer.get_base_layer().weight
            identity = torch.eye(weight.shape[1], dtype=torch.float64)
            delta = (layer(identity) - identity @ weight.T).T
            check_finite(f"module {name!r}", delta)
            deltas[name] = delta.float()
    return deltas


def _skeleton(weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """A module tree holding only bias-free float64 linears at the given names."""
    root = nn.Module()
    for name, weight in weights.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float64)
        linear.weight.data.copy_(weight.double())
        parent.add_module(leaf, linear)
    return root


def _load_params(name: str, layer: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    """Copy the saved tensors into peft's parameters of one layer; every parameter must be given."""
    expected = {
        attr: getattr(layer, attr)[_ADAPTER]
        for attr in getattr(layer, "adapter_layer_names", ())
        if isinstance(getattr(layer, attr, None), nn.ParameterDict) and _ADAPTER in getattr(layer, attr)
    }
    unknown = sorted(set(params) - set(expected))
    missing = sorted(set(expected) - set(params))
    if unknown or missing:
        raise AdapterLoadError(
            f"module {name!r}: tensors {unknown or ''} are not what the config builds"
            f"{f'; missing {missing}' if missing else ''} (was it trained with another config or base?)"
        )
    for attr, target in expected.items():
        tensor = params[attr]
        if tuple(tensor.shape) != tuple(target.shape):
            raise AdapterLoadError(
                f"module {name!r}: {attr} has shape {tuple(tensor.shape)}, but on this base it is {tuple(target.shape)}"
            )
        target.copy_(tensor.double())
