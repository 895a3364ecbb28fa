"""LoRA's training forward as one autograd function: dropout, both factors and the scaling.

peft computes `lora_B(lora_A(dropout(x))) * scaling` with stock modules. On the CPU that costs,
per adapted linear and token, a float dropout mask *and* the dropped input (8 bytes per input
feature) kept for backward, plus one `bernoulli_` draw per element from torch's serial CPU
generator: together about half of a QLoRA step's saved activations and a sixth of its time on
SmolLM2-135M. `LoraDelta` instead keeps the undropped input (which the q/k/v, and the gate/up,
projections share, so it is kept once) and a 1-byte keep mask, and draws the mask 16 bits per
element from 64-bit words (`keep_mask`), a quarter of the generator calls.

The result is the same function: a dropped feature is zeroed and the kept ones are scaled by
1/(1 - p), with p rounded to a multiple of 1/65536 (0.05 becomes 0.0500031). Layers that are not
plain LoRA (DoRA and the other variants, merged or disabled adapters, mixed-adapter batches,
autocast) keep peft's own forward.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn
from torch.autograd.function import once_differentiable

_MASK_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A bool mask of `shape` keeping each element with probability 1 - p', and 1 / (1 - p').

    p' is p rounded to a multiple of 1/65536: each element compares 16 random bits, cut from
    64-bit words drawn from torch's default generator (so a checkpoint's RNG state replays it)."""
    dropped_levels = round(p * _MASK_LEVELS)
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    draws = words.view(torch.int16)[:count].view(shape)
    keep = draws >= dropped_levels - _MASK_LEVELS // 2
    return keep, _MASK_LEVELS / (_MASK_LEVELS - dropped_levels)


def _dropped_rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x as [rows, features] with the dropped features zeroed (unscaled)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if keep is None else flat * keep.reshape(flat.shape)


class LoraDelta(torch.autograd.Function):
    """`((x * keep) @ A.T) @ B.T * scale` keeping x, the bool mask and the rank-r product for backward."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, keep, scale):
        scaled_h = (_dropped_rows(x, keep) @ weight_a.T).mul_(scale)
        out = scaled_h @ weight_b.T
        ctx.save_for_backward(x, keep, scaled_h, weight_a, weight_b)
        ctx.scale = scale
        return out.view(*x.shape[:-1], weight_b.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, keep, scaled_h, weight_a, weight_b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_b = grad.T @ scaled_h if need_b else None
        grad_h = (grad @ weight_b).mul_(ctx.scale)
        grad_a = grad_x = None
        if need_a:  # the dropped input is recomputed from x and the mask rather than kept
            grad_a = grad_h.T @ _dropped_rows(x, keep)
        if need_x:
            grad_x = grad_h @ weight_a
            if keep is not None:
                grad_x.mul_(keep.reshape(grad_x.shape))
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_a, grad_b, None, None


def lora_delta(
    x: torch.Tensor, lora_a: nn.Linear, lora_b: nn.Linear, dropout: nn.Module, scaling: float
) -> torch.Tensor:
    """One adapter's `lora_B(lora_A(dropout(x))) * scaling`, through `LoraDelta`."""
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    keep, scale = (None, 1.0) if p == 0 else keep_mask(x.shape, p, x.device)
    return LoraDelta.apply(x, lora_a.weight, lora_b.weight, keep, scaling * scale)


def _plain_lora(layer: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether `layer`'s forward is exactly base + the sum of plain LoRA deltas."""
    if args or kwargs or layer.disable_adapters or layer.merged or torch.is_autocast_enabled():
        return False
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in layer.lora_variant or layer.lora_A[name].bias is not None or layer.lora_B[name].bias is not None:
            return False
    return True


def _fused_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not _plain_lora(self, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_a = self.lora_A[name]
        delta = lora_delta(x.to(lora_a.weight.dtype), lora_a, self.lora_B[name], self.lora_dropout[name],
                           self.scaling[name])
        result = result + delta.to(result.dtype)
    return result


def _fusable_types() -> tuple[type, ...]:
    from peft.tuners.lora import Linear

    types_ = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes not installed
        pass
    else:
        types_.append(Linear4bit)
    return tuple(types_)


def use_fused_lora(model: nn.Module) -> int:
    """Route each peft LoRA linear of `model` (plain or on a 4-bit base) through `LoraDelta`; returns how many.

    Other layer types are left alone; a routed layer still falls back to peft's forward whenever
    its adapters are not plain LoRA (see `_plain_lora`)."""
    fusable = _fusable_types()
    routed = 0
    for module in model.modules():
        if type(module) in fusable:
            module.forward = types.MethodType(_fused_forward, module)
            routed += 1
    return routed
