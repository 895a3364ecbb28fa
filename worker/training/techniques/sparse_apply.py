"""Rebuild a sparse-trained model: add an artifact's sparse deltas, in place, to a loaded base.

The files are read by `worker.formats.sparse_deltas` (written there by `SparseTraining.save`); this is
the training side's reload, used by `worker.training.artifacts.load_trained_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from worker.formats.sparse_deltas import LinearDelta, SparseDeltaError, read_sparse_deltas
from worker.model_parts import decoder_layers, is_4bit, unwrap_causal_lm


def apply_sparse_deltas(model: torch.nn.Module, folder: Path | str) -> dict[str, LinearDelta]:
    """Add a sparse artifact's deltas, in place, to the decoder linears of `model`; return them.

    `model` is a causal LM (or a peft model around one, whose LoRA-wrapped linears are handled).
    Every delta is checked against the model before anything changes. A bias marked "added" becomes
    a new bias parameter. A 4-bit `Linear4bit` takes bias deltas but refuses a weight delta.
    """
    deltas = read_sparse_deltas(folder)
    targets = {name: _target_linear(model, delta) for name, delta in deltas.items()}
    with torch.no_grad():
        for name, delta in deltas.items():
            linear = targets[name]
            if delta.weight is not None:
                _add_weight_delta(linear, delta)
            if delta.bias is not None:
                _add_bias_delta(linear, delta)
    return deltas


def _target_linear(model: torch.nn.Module, delta: LinearDelta) -> torch.nn.Linear:
    causal_lm = unwrap_causal_lm(model)
    name = delta.module_name
    try:
        module = causal_lm.get_submodule(name)
    except AttributeError:
        raise SparseDeltaError(f"the model has no module {name!r}") from None
    while hasattr(module, "base_layer"):  # a peft tuner layer around the base linear
        module = module.base_layer
    if not isinstance(module, torch.nn.Linear):
        raise SparseDeltaError(f"{name} is a {type(module).__name__}, not a linear layer")
    if not any(module is m for m in _decoder_modules(causal_lm)):
        raise SparseDeltaError(f"{name} is not a linear inside the decoder layers")
    out_features, in_features = module.out_features, module.in_features
    if delta.weight is not None:
        if tuple(delta.weight.shape) != (out_features, in_features):
            raise SparseDeltaError(f"{name}.weight delta has shape {list(delta.weight.shape)}, "
                                   f"the model's weight is {[out_features, in_features]}")
        if is_4bit(module):
            raise SparseDeltaError(f"{name} is a 4-bit Linear4bit: sparse weight deltas need a full-precision base")
    if delta.bias is not None:
        if delta.bias.shape[0] != out_features:
            raise SparseDeltaError(f"{name}.bias delta has {delta.bias.shape[0]} entries for {out_features} outputs")
        if delta.bias_added and module.bias is not None:
            raise SparseDeltaError(f"{name}.bias is marked added, but the base already has a bias")
        if not delta.bias_added and module.bias is None:
            raise SparseDeltaError(f"{name} has no bias in the base, but its bias delta is not marked added")
    return module


def _decoder_modules(causal_lm: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        return list(decoder_layers(causal_lm).modules())
    except ValueError:  # no decoder layers: no linear is inside them
        return []


def _add_weight_delta(linear: torch.nn.Linear, delta: LinearDelta) -> None:
    weight = linear.weight
    entries = delta.weight_stored_entries
    if entries is None:
        weight.copy_((weight.float() + delta.weight.to(weight.device)).to(weight.dtype))
        return
    flat = weight.view(-1)
    indices = entries.indices.to(weight.device)
    flat[indices] = (flat[indices].float() + entries.values.to(weight.device)).to(weight.dtype)


def _add_bias_delta(linear: torch.nn.Linear, delta: LinearDelta) -> None:
    if delta.bias_added:
        # A 4-bit linear computes in its compute dtype (and casts its bias to it on each call).
        dtype = getattr(linear, "compute_dtype", None) if is_4bit(linear) else linear.weight.dtype
        linear.bias = torch.nn.Parameter(
            delta.bias.to(linear.weight.device, dtype or torch.float32), requires_grad=False
        )
        return
    bias = linear.bias
    bias.copy_((bias.float() + delta.bias.to(bias.device)).to(bias.dtype))
