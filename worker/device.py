"""Pick the device to run a model on and the dtype to compute in; used by training and inference."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceChoice:
    """Where a model runs and in which dtype its matmuls are computed."""

    device: torch.device
    compute_dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        """The compute dtype's short name, e.g. "float32"."""
        return str(self.compute_dtype).removeprefix("torch.")


def compute_dtype_for(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere: on CPUs without bf16 instructions, bf16 compute is about
    1.8x slower than fp32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def choose_device(device: DeviceChoice | torch.device | str | None = None) -> DeviceChoice:
    """The given device with its compute dtype; by default CUDA when a GPU is available, else CPU."""
    if isinstance(device, DeviceChoice):
        return device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return DeviceChoice(device, compute_dtype_for(device))
