"""Layer drop: each decoder layer is skipped with probability p on each optimizer step, in training only."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from worker.model_parts import decoder_layers


class LayerDrop:
    """Skips sampled decoder layers (their input passes through unchanged) while the model trains.

    The skipped set depends only on (seed, step), so a resumed job skips the same layers, and it
    stays the same for every micro-batch of a step until `begin_step` is called. At least one layer
    always runs. A layer in eval mode never skips, so validation and inference see the whole model.

    It is installed by overriding each layer instance's `forward`: module names, parameter names
    and saved keys do not change, and transformers' gradient checkpointing (which wraps the class's
    forward) still applies to the layers that run.
    """

    def __init__(self, model: torch.nn.Module, p: float, seed: int) -> None:
        if not 0 <= p < 1:
            raise ValueError(f"layer drop probability must be in [0, 1), got {p}")
        self.p = p
        self.seed = seed
        self.layers = list(decoder_layers(model))
        for layer in self.layers:
            _require_tensor_output(layer)
            if "forward" in layer.__dict__:
                raise ValueError(f"{type(layer).__name__} already has its forward replaced (layer drop twice?)")
        self.step = 0
        self.dropped = self.dropped_layers(0)
        for index, layer in enumerate(self.layers):
            layer.forward = self._skipping_forward(index, layer)

    def dropped_layers(self, step: int) -> frozenset[int]:
        """The indices of the layers skipped on optimizer step `step` (never all of them)."""
        rng = np.random.default_rng([self.seed, step])
        n = len(self.layers)
        dropped = {i for i, u in enumerate(rng.random(n)) if u < self.p}
        if len(dropped) == n:
            dropped.discard(int(rng.integers(n)))
        return frozenset(dropped)

    def begin_step(self, step: int) -> None:
        """Sample the layers to skip for optimizer step `step` (call before its first forward)."""
        self.step = step
        self.dropped = self.dropped_layers(step)

    def _skipping_forward(self, index: int, layer: torch.nn.Module):
        run_layer = layer.forward  # the class's forward, bound (with its checkpointing wrapper)

        def forward(*args, **kwargs):
            if layer.training and index in self.dropped:
                return args[0] if args else kwargs["hidden_states"]
            return run_layer(*args, **kwargs)

        return forward

    def uninstall(self) -> None:
        """Give every layer its own forward back."""
        for layer in self.layers:
            if "forward" in layer.__dict__:
                del layer.forward


def _require_tensor_output(layer: torch.nn.Module) -> None:
    returns = inspect.signature(type(layer).forward).return_annotation
    if returns not in (torch.Tensor, "torch.Tensor", "Tensor"):
        raise ValueError(
            f"layer drop needs decoder layers that return the hidden states tensor; "
            f"{type(layer).__name__} returns {returns}"
        )


def fill_missing_grads(params) -> None:
    """Give a zero gradient to every parameter that requires one but has none (its layer was skipped).

    Call after `optimizer.step()` (which leaves skipped layers untouched because their gradient is
    None) and before code that reads every gradient, such as AdaLoRA's `update_and_allocate`.
    """
    for param in params:
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)
