"""Save and restore a training checkpoint folder without pickle.

Layout of a checkpoint folder:
- `adapter/`: the method's artifact (adapter_config.json + adapter_model.safetensors), usable on its own;
- `trainable.safetensors`: every trainable parameter, keyed by name (restored on resume; the artifact
  alone may not hold them, e.g. prefix tuning saves its projected prefix, not the projection);
- `method_state.safetensors` / `method_state.json`: the method's own state, when it has any
  (AdaLoRA's importance scores and rank pattern);
- `optimizer.safetensors`: every optimizer state tensor, keyed `<parameter name>/<state key>`;
- `rng.safetensors`: the torch CPU (and CUDA) random generator states;
- `trainer_state.json`: the step, the optimizer's hyperparameters, the LR scheduler's state
  and the run's progress counters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from worker.training.methods import AttachedMethod

ADAPTER_DIR = "adapter"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 2


def _rng_state() -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda_{i}"] = state
    return states


def _restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [states[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda_{i}" in states]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _optimizer_to_files(
    optimizer: torch.optim.Optimizer, param_names: list[str]
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split the optimizer state into named tensors and JSON-able parameter groups."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, state in state_dict["state"].items():
        name = param_names[index]
        for key, value in state.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{name}/{key}"] = tensor.detach().to("cpu").contiguous()
    groups = []
    for group in state_dict["param_groups"]:
        plain = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        plain["param_names"] = [param_names[i] for i in group["params"]]
        groups.append(plain)
    return tensors, groups


def _optimizer_from_files(
    optimizer: torch.optim.Optimizer, param_names: list[str], tensors: dict[str, torch.Tensor], groups: list[dict]
) -> None:
    index_of = {name: i for i, name in enumerate(param_names)}
    saved_names = [name for group in groups for name in group["param_names"]]
    if saved_names != param_names:
        raise ValueError("the checkpoint's optimizer was built over different parameters")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, state_key = key.rpartition("/")
        state.setdefault(index_of[name], {})[state_key] = tensor
    param_groups = []
    for group in groups:
        restored = {k: (tuple(v) if k == "betas" else v) for k, v in group.items() if k != "param_names"}
        restored["params"] = [index_of[name] for name in group["param_names"]]
        param_groups.append(restored)
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_training_checkpoint(
    folder: Path,
    *,
    method: AttachedMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    param_names: list[str],
    step: int,
    progress: dict,
) -> Path:
    """Write everything needed to continue training exactly at `step` into `folder`; return it.

    `param_names` names the optimizer's parameters in the order they were given to it;
    `progress` is any JSON-able dict of counters the caller wants back on resume.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    method.save(folder / ADAPTER_DIR)
    method.save_state(folder)
    tensors, groups = _optimizer_to_files(optimizer, param_names)
    save_file(tensors, folder / OPTIMIZER_FILE)
    save_file(_rng_state(), folder / RNG_FILE)
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "optimizer_param_groups": groups,
        "scheduler": scheduler.state_dict(),
        "progress": progress,
    }
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    return folder


def load_training_checkpoint(
    folder: Path,
    *,
    method: AttachedMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    param_names: list[str],
) -> tuple[int, dict]:
    """Restore trainable weights, method state, optimizer, scheduler and RNG from `folder`;
    return (step, progress)."""
    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint format {state.get('format_version')!r}")
    method.load_state(folder)
    # Loaded on CPU: load_state_dict moves each moment to its parameter's device, keeps `step` on CPU.
    tensors = load_file(folder / OPTIMIZER_FILE)
    _optimizer_from_files(optimizer, param_names, tensors, state["optimizer_param_groups"])
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(load_file(folder / RNG_FILE))
    return int(state["step"]), state["progress"]
