"""oneDNN matmuls for the served model's plain linears on CPU.

At decode time every linear multiplies a handful of rows by its whole weight, so the step is bound by
reading weights. For such shapes on CPU, PyTorch's default fp32 linear (MKL's sgemm) reached about a
third of the memory bandwidth that oneDNN's inner product does (the README's "Tests and benchmarks"
has the profile). `use_onednn_linears` routes every plain `nn.Linear` of a model through
`torch.ops.mkldnn._linear_pointwise`, on the weight as it is: no second copy of the weights is kept,
so adapters that read a base weight (DoRA, merges) see the same tensor. Results equal the default
linear's up to float rounding (a different summation order), as between any two BLAS kernels.

Skipped where it does not apply: CUDA, quantized layers (bitsandbytes), dtypes other than fp32 and
bf16, and builds without oneDNN.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

logger = logging.getLogger(__name__)

ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != self.weight.dtype or x.requires_grad:  # oneDNN's op has no autograd and wants one dtype
        return nn.functional.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [None], "")


def use_onednn_linears(model: nn.Module) -> int:
    """Route the model's plain CPU linears through oneDNN (in place); returns how many were switched."""
    if not onednn_available():
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is not nn.Linear:  # subclasses (bitsandbytes' Linear4bit) keep their own forward
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.dtype not in ONEDNN_DTYPES:
            continue
        module.forward = types.MethodType(_onednn_forward, module)
        switched += 1
    logger.debug("oneDNN linears: %d", switched)
    return switched
