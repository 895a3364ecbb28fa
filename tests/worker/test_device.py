"""The device choice: the given device or CUDA when present, bf16 compute on CUDA, fp32 elsewhere."""

from __future__ import annotations

import torch

from worker.device import DeviceChoice, choose_device, compute_dtype_for


def test_a_named_device_gets_its_compute_dtype():
    assert choose_device("cpu") == DeviceChoice(torch.device("cpu"), torch.float32)
    assert choose_device(torch.device("cuda")) == DeviceChoice(torch.device("cuda"), torch.bfloat16)
    assert choose_device("cpu").dtype_name == "float32"


def test_a_choice_is_kept_as_given():
    choice = DeviceChoice(torch.device("cpu"), torch.bfloat16)
    assert choose_device(choice) is choice


def test_the_default_is_cuda_when_present():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    default = choose_device()
    assert default.device == torch.device(expected)
    assert default.compute_dtype == compute_dtype_for(default.device)
