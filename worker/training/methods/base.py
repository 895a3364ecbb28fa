"""What every attached fine-tuning method offers the recipe: its trainable module, artifact and state."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

TRAINABLE_FILE = "trainable.safetensors"
"""Checkpoint file with every trainable parameter, keyed by its name in `AttachedMethod.model`."""
METHOD_STATE_FILE = "method_state.safetensors"
METHOD_STATE_JSON = "method_state.json"


def logical_numel(param: torch.Tensor) -> int:
    """A parameter's element count; a bitsandbytes 4-bit weight counts at its unquantized shape."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return param.numel()


def count_params(module: nn.Module) -> int:
    """The logical parameter count of a module (shared parameters counted once)."""
    return sum(logical_numel(p) for p in module.parameters())


class AttachedMethod:
    """A fine-tuning method attached to a causal LM.

    `model` is the module to train and call (a peft `PeftModel`, or the causal LM itself with our
    own adapters hooked in); `causal_lm` is the transformers model underneath. `base_params` is the
    base model's logical parameter count, taken before the method was attached.
    """

    name: str
    prompt_learning = False
    virtual_tokens_in_logits = 0
    """Positions the forward prepends to the logits (prompt_tuning/p_tuning's virtual tokens)."""

    def __init__(self, name: str, model: nn.Module, causal_lm: nn.Module, base_params: int) -> None:
        self.name = name
        self.model = model
        self.causal_lm = causal_lm
        self.base_params = base_params

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every parameter that trains, in a stable order."""
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) logical parameter counts of the whole model."""
        trainable = total = 0
        for param in self.model.parameters():
            n = logical_numel(param)
            total += n
            if param.requires_grad:
                trainable += n
        return trainable, total

    def adapter_disabled(self) -> AbstractContextManager:
        """A context in which the model computes as its base would (DPO's reference model).

        The default suits methods whose freshly attached adapter is the identity (zero-initialised
        output): before the first step, the model with the adapter on *is* the base.
        """
        return nullcontext()

    # ---- hooks into the training step (no-ops unless a method needs them) ----------------------

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser to add to the step's loss, or None."""
        return None

    def after_optimizer_step(self, step: int) -> None:
        """Called after `optimizer.step()` and before `zero_grad()`, with the 0-based step index."""

    def finalize(self) -> None:
        """Bring the in-memory model to exactly what `save` writes (called once, after the last step)."""

    # ---- artifact and checkpoint state ---------------------------------------------------------

    def save(self, folder: Path) -> Path:
        """Write the artifact (`adapter_config.json` + `adapter_model.safetensors`) into `folder`."""
        raise NotImplementedError

    def load_adapter_weights(self, folder: Path) -> None:
        """Start from the weights of a saved artifact of this method and shape (a job that continues one)."""
        raise ValueError(f"method {self.name} cannot start from a saved adapter's weights")

    def _check_artifact_fits(self, saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
        """Refuse `saved` unless it has exactly the tensors (names, shapes) of this model's artifact, `expected`,
        and those cover every trainable parameter."""
        missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(f"the saved adapter does not fit this job's {self.name} model: {len(missing)} tensor(s) "
                             f"missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
        for name, tensor in expected.items():
            if saved[name].shape != tensor.shape:
                raise ValueError(f"the saved adapter's {name} has shape {tuple(saved[name].shape)}, this job's "
                                 f"model has {tuple(tensor.shape)}")
        trained, held = sum(p.numel() for _, p in self.named_trainable()), sum(t.numel() for t in expected.values())
        if trained != held:
            raise ValueError(f"this job trains {trained} values, but the saved adapter holds {held}: the rest would "
                             "start untrained")

    def save_state(self, folder: Path) -> None:
        """Write everything needed to resume exactly: trainable parameters and method state."""
        folder = Path(folder)
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in self.named_trainable()}
        save_file(tensors, folder / TRAINABLE_FILE)
        extra_tensors, extra_json = self._extra_state()
        if extra_tensors:
            save_file(extra_tensors, folder / METHOD_STATE_FILE)
        if extra_json:
            (folder / METHOD_STATE_JSON).write_text(json.dumps(extra_json))

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote; refuses a checkpoint of other parameters."""
        folder = Path(folder)
        saved = load_file(folder / TRAINABLE_FILE)
        params = dict(self.named_trainable())
        if saved.keys() != params.keys():
            missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
            raise ValueError(f"checkpoint parameters do not fit the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, param in params.items():
                if saved[name].shape != param.shape:
                    raise ValueError(f"checkpoint parameter {name} has shape {tuple(saved[name].shape)}, "
                                     f"the model's is {tuple(param.shape)}")
                param.copy_(saved[name])
        tensors_path, json_path = folder / METHOD_STATE_FILE, folder / METHOD_STATE_JSON
        self._load_extra_state(
            load_file(tensors_path) if tensors_path.is_file() else {},
            json.loads(json_path.read_text()) if json_path.is_file() else {},
        )

    def _extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {}

    def _load_extra_state(self, tensors: dict[str, torch.Tensor], data: dict) -> None:
        pass
