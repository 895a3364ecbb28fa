"""The served model's plain CPU linears on whichever kernel is faster here, measured at start.

For fp32/bf16 on CPU there are two good kernels: PyTorch's default (MKL's sgemm) and oneDNN's inner
product (`torch.ops.mkldnn._linear_pointwise`, on the weight as it is, so no second copy of the
weights is kept and adapters that read a base weight, DoRA and merges, see the same tensor). Which
one wins depends on the CPU and on how many rows a call multiplies: on one 2-core machine oneDNN
decoded 16 rows about twice as fast; on another MKL was faster at every row count, by 10% on a
36-token prefill. So `LinearKernels.calibrate` times the model's own forward with each kernel for
a few row counts (`ROW_BUCKETS`) and every call then takes the faster kernel for its row count.
Results equal the default linear's up to float rounding (a different summation order), as between
any two BLAS kernels.

Skipped where it does not apply: CUDA, quantized layers (bitsandbytes), dtypes other than fp32 and
bf16, autograd, and builds without oneDNN.
"""

from __future__ import annotations

import logging
import math
import time
import types
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
ROW_BUCKETS = (1, 4, 16, 64, 256)
"""Row counts measured; a call takes the choice of the bucket nearest its row count (by ratio)."""
CALIBRATION_REPEATS = 2


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class LinearKernels:
    """Per row-count bucket, whether oneDNN beats the default kernel; shared by every switched linear.

    Until `calibrate` runs (or with `forced` set) every call takes oneDNN (or the forced kernel)."""

    def __init__(self) -> None:
        self.onednn_by_bucket: dict[int, bool] = {bucket: True for bucket in ROW_BUCKETS}
        self.forced: bool | None = None
        self.timings_ms: dict[int, dict[str, float]] = {}
        self._bucket_of: dict[int, int] = {}

    def use_onednn(self, rows: int) -> bool:
        """Whether a call multiplying `rows` rows takes oneDNN."""
        if self.forced is not None:
            return self.forced
        bucket = self._bucket_of.get(rows)
        if bucket is None:  # once per row count: every linear of a step asks
            bucket = self._bucket_of[rows] = min(ROW_BUCKETS, key=lambda size: abs(math.log(max(rows, 1) / size)))
        return self.onednn_by_bucket[bucket]

    def calibrate(self, run: Callable[[int], None], repeats: int = CALIBRATION_REPEATS) -> None:
        """Time `run(rows)` (a forward over that many rows) with each kernel, alternating, for every bucket;
        keep the faster (the best of `repeats` runs each, after one warm-up run each)."""
        for rows in ROW_BUCKETS:
            best = {True: float("inf"), False: float("inf")}
            for attempt in range(repeats + 1):
                for onednn in ((True, False) if attempt % 2 == 0 else (False, True)):
                    self.forced = onednn
                    started = time.perf_counter()
                    run(rows)
                    if attempt:  # the first round warms each kernel up
                        best[onednn] = min(best[onednn], time.perf_counter() - started)
            self.onednn_by_bucket[rows] = best[True] < best[False]
            self.timings_ms[rows] = {"onednn": round(best[True] * 1e3, 2), "default": round(best[False] * 1e3, 2)}
        self.forced = None
        logger.info("linear kernels by rows: %s", self.describe())

    def describe(self) -> dict[int, str]:
        """The kernel each bucket takes, e.g. {1: "default", 16: "onednn"}."""
        return {rows: "onednn" if onednn else "default" for rows, onednn in self.onednn_by_bucket.items()}


def _dispatching_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # oneDNN's op has no autograd and wants one dtype
    if x.dtype != self.weight.dtype or x.requires_grad or not self.linear_kernels.use_onednn(x.numel() // x.shape[-1]):
        return nn.functional.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [None], "")


def use_onednn_linears(model: nn.Module, kernels: LinearKernels | None = None) -> int:
    """Let the model's plain CPU linears take oneDNN where `kernels` says so (in place); returns how many."""
    if not onednn_available():
        return 0
    kernels = kernels or LinearKernels()
    switched = 0
    for module in model.modules():
        if type(module) is not nn.Linear:  # subclasses (bitsandbytes' Linear4bit) keep their own forward
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.dtype not in ONEDNN_DTYPES:
            continue
        module.linear_kernels = kernels
        module.forward = types.MethodType(_dispatching_forward, module)
        switched += 1
    logger.debug("oneDNN-capable linears: %d", switched)
    return switched
