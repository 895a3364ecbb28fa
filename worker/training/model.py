"""Load the base model for training, attach the job's method and techniques, and report the quantization."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from core.schemas.training import ResolvedTraining
from worker import base_loading
from worker.base_loading import load_tokenizer
from worker.device import DeviceChoice
from worker.model_parts import decoder_linears
from worker.training.methods import AttachedMethod, attach_method
from worker.training.techniques import Techniques


@dataclass
class LoadedModel:
    """The method-wrapped model and its tokenizer, ready to train."""

    method: AttachedMethod
    tokenizer: PreTrainedTokenizerBase

    @property
    def model(self) -> torch.nn.Module:
        """The module to train and call: a `PeftModel`, or the causal LM with our own adapters."""
        return self.method.model

    @property
    def causal_lm(self) -> torch.nn.Module:
        """The transformers causal LM underneath (with the method's layers injected or hooked)."""
        return self.method.causal_lm

    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; a 4-bit weight counts as its logical size."""
        return self.method.param_counts()


NO_GRADIENT_CHECKPOINTING = ("prefix_tuning",)
"""Methods that cannot train with activation checkpointing (peft's prefix cache would be recomputed)."""


def gradient_checkpointing_applies(config: ResolvedTraining) -> bool:
    """Whether the job trains with activation checkpointing from the start: asked for (true), and possible for
    its method. `"auto"` is decided once the model is loaded (`worker.training.activation_memory`)."""
    return config.peft.gradient_checkpointing is True and config.peft.method not in NO_GRADIENT_CHECKPOINTING


def enable_activation_checkpointing(causal_lm: torch.nn.Module) -> None:
    """Checkpoint every decoder layer (non-reentrant: no input-requires-grad hook needed)."""
    causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def load_model_for_training(
    base_model_path: str,
    config: ResolvedTraining,
    device: DeviceChoice,
    *,
    total_steps: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    techniques: Techniques | None = None,
) -> LoadedModel:
    """Load and quantize the base model as configured, and attach the job's method and techniques.

    `total_steps` (AdaLoRA's schedule) defaults to the spec's expected steps. Set the random seed
    before calling: the adapter's initial weights are random.
    """
    tokenizer = tokenizer or load_tokenizer(base_model_path)
    total_steps = total_steps if total_steps is not None else (config.expected_steps or 1)
    techniques = techniques or Techniques(config, total_steps)
    skip_modules = techniques.skip_modules(base_model_path) if config.quantization != "none" else None
    base = base_loading.load_base_model(
        base_model_path, config.quantization, device, training=True, skip_modules=skip_modules
    )
    if gradient_checkpointing_applies(config):
        enable_activation_checkpointing(base)
    techniques.before_attach(base)
    added = techniques.added_params()
    method = attach_method(
        base, config, base_model_path=base_model_path, total_steps=total_steps, adapter_dtype=device.compute_dtype,
    )
    method.base_params -= added
    techniques.after_attach(method.model)
    return LoadedModel(method=method, tokenizer=tokenizer)


@contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (dropout off) for a validation pass or a probe, then back to each module's previous mode.

    bitsandbytes' `Linear4bit` repacks its weight for CPU inference the first time it runs in
    eval mode on a CPU with AVX512-BF16, and never unpacks it on `train()`: later backward passes
    then go through a kernel without autograd and silently drop the gradient flowing to earlier
    layers. So the 4-bit linears stay in training mode (it changes nothing else for them).
    """
    import bitsandbytes as bnb

    with modes_restored(model):
        model.eval()
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.training = True
        yield


@contextmanager
def modes_restored(model: torch.nn.Module) -> Iterator[None]:
    """Afterwards, every module back in the training or eval mode it had before the block."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _quant_state_bytes(quant_state) -> tuple[int, int]:
    """(scale bytes, lookup-table bytes) of a bitsandbytes QuantState, nested state included."""
    scale = quant_state.absmax.numel() * quant_state.absmax.element_size()
    tables = quant_state.code.numel() * quant_state.code.element_size() if quant_state.code is not None else 0
    if quant_state.nested:
        inner = quant_state.state2
        scale += inner.absmax.numel() * inner.absmax.element_size()
        tables += inner.code.numel() * inner.code.element_size() if inner.code is not None else 0
        offset = quant_state.offset
        if isinstance(offset, torch.Tensor):
            scale += offset.numel() * offset.element_size()
    return scale, tables


def quantization_report(model: torch.nn.Module) -> dict:
    """Describe how the decoder linears are stored: count, 4-bit or not, nesting, and measured bits/param.

    `bits_per_param` counts the packed weights plus every scale (absmax, and the nested
    second-level absmax and offset); `bits_per_param_with_tables` also counts the lookup tables.
    """
    import bitsandbytes as bnb

    linears = list(decoder_linears(model).values())
    quantized = [m for m in linears if isinstance(m, bnb.nn.Linear4bit)]
    params = weight_bytes = scale_bytes = table_bytes = 0
    quant_types, blocksizes, nested = set(), set(), []
    compute_dtypes = set()
    for module in quantized:
        weight = module.weight
        state = weight.quant_state
        params += torch.Size(state.shape).numel()
        weight_bytes += weight.numel() * weight.element_size()
        scale, tables = _quant_state_bytes(state)
        scale_bytes += scale
        table_bytes += tables
        quant_types.add(state.quant_type)
        blocksizes.add(state.blocksize)
        nested.append(bool(state.nested))
        compute_dtypes.add(str(module.compute_dtype or state.dtype).removeprefix("torch."))
    if not quantized:
        dense_params = sum(m.weight.numel() for m in linears)
        dense_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        dtypes = {str(m.weight.dtype).removeprefix("torch.") for m in linears}
        return {
            "decoder_linears": len(linears),
            "linear4bit": 0,
            "all_nested": False,
            "quant_type": None,
            "blocksize": None,
            "bits_per_param": round(8 * dense_bytes / dense_params, 3) if dense_params else None,
            "bits_per_param_with_tables": None,
            "compute_dtype": ",".join(sorted(dtypes)) or None,
        }
    return {
        "decoder_linears": len(linears),
        "linear4bit": len(quantized),
        "all_nested": all(nested),
        "quant_type": ",".join(sorted(quant_types)),
        "blocksize": blocksizes.pop() if len(blocksizes) == 1 else sorted(blocksizes),
        "bits_per_param": round(8 * (weight_bytes + scale_bytes) / params, 3),
        "bits_per_param_with_tables": round(8 * (weight_bytes + scale_bytes + table_bytes) / params, 3),
        "compute_dtype": ",".join(sorted(compute_dtypes)),
    }
