"""The fine-tuning techniques of a job (sparse, layer_drop, layerwise_lr_decay), combinable with any method.

`Techniques` is what the recipe talks to; each technique lives in its own module.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.schemas.training import ResolvedTraining
from worker.training.techniques.layer_drop import LayerDrop, fill_missing_grads
from worker.training.techniques.layerwise_lr import group_param_names, optimizer_param_groups
from worker.training.techniques.sparse import SparseTraining, quantization_skip_modules

SPARSE_STATE_FILE = "sparse_state.safetensors"
"""Checkpoint file with the sparse technique's mask and gradient statistics."""


class Techniques:
    """The job's techniques around one training run, in the recipe's lifecycle order:
    `skip_modules` (before loading), `before_attach` / `after_attach` (around the method),
    `param_groups` (the optimizer), `begin_step` / `after_optimizer_step` (each step),
    `save_state` / `load_state` (checkpoints), `save` (the artifact), `remove` (cleanup).
    """

    def __init__(self, config: ResolvedTraining, total_steps: int) -> None:
        spec = config.peft
        self.config = config
        self.sparse_spec = spec.sparse
        if self.sparse_spec is not None and self.sparse_spec.kind == "top_k":
            # Selection needs at least one step after the warm-up to train anything.
            warmup = min(self.sparse_spec.warmup_steps, max(1, total_steps // 2))
            self.sparse_spec = self.sparse_spec.model_copy(update={"warmup_steps": warmup})
        self.sparse: SparseTraining | None = None
        self.layer_drop: LayerDrop | None = None

    def skip_modules(self, base_model_path: str) -> list[str] | None:
        """Base modules that must stay out of 4-bit quantization (the sparse technique trains them)."""
        return quantization_skip_modules(self.sparse_spec, base_model_path)

    def before_attach(self, causal_lm: torch.nn.Module) -> None:
        """Choose the sparse parameters on the bare base (adding BitFit's zero biases)."""
        if self.sparse_spec is not None:
            self.sparse = SparseTraining(causal_lm, self.sparse_spec)

    def after_attach(self, model: torch.nn.Module) -> None:
        """Make the sparse parameters trainable again (attaching froze the base) and install layer drop."""
        if self.sparse is not None:
            self.sparse.make_trainable()
        if self.config.peft.layer_drop:
            self.layer_drop = LayerDrop(model, self.config.peft.layer_drop, seed=self.config.seed)

    def param_groups(
        self, named: list[tuple[str, torch.nn.Parameter]], model: torch.nn.Module
    ) -> tuple[list[dict], list[str]]:
        """AdamW parameter groups (layer-wise learning rates when asked) and their parameter names in order."""
        groups = optimizer_param_groups(
            named, model, lr=self.config.learning_rate, weight_decay=self.config.peft.weight_decay,
            decay=self.config.peft.layerwise_lr_decay,
            without_weight_decay=self.sparse.params_without_weight_decay() if self.sparse else (),
        )
        return groups, group_param_names(groups)

    def begin_step(self, step: int) -> None:
        """Sample the layers that step `step` skips."""
        if self.layer_drop is not None:
            self.layer_drop.begin_step(step)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        """Advance the sparse selection; give skipped layers a zero gradient for code that reads every one."""
        if self.sparse is not None:
            self.sparse.after_optimizer_step(optimizer)
        if self.layer_drop is not None:
            fill_missing_grads(params)

    def trainable_params(self, method_trainable: list[torch.nn.Parameter]) -> int:
        """Exact trainable count: the method's own parameters plus the entries the sparse technique trains."""
        if self.sparse is None:
            return sum(p.numel() for p in method_trainable)
        sparse_ids = {id(p) for p in self.sparse.parameters()}
        own = sum(p.numel() for p in method_trainable if id(p) not in sparse_ids)
        return own + self.sparse.trainable_entries

    def added_params(self) -> int:
        """Parameters added to the base (BitFit's biases): trained, but not part of the base's size."""
        return sum(p.numel() for p in self.sparse.added_parameters()) if self.sparse else 0

    def save_state(self, folder: Path) -> None:
        """Write the sparse technique's state into a checkpoint folder."""
        if self.sparse is not None:
            save_file(self.sparse.state_dict(), Path(folder) / SPARSE_STATE_FILE)

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote."""
        if self.sparse is not None:
            self.sparse.load_state_dict(load_file(Path(folder) / SPARSE_STATE_FILE))

    def save(self, adapter_dir: Path) -> None:
        """Add the sparse deltas (only what changed, with its mask) to the artifact folder."""
        if self.sparse is not None:
            self.sparse.save(adapter_dir)

    def remove(self) -> None:
        """Uninstall layer drop and the gradient masks. Idempotent."""
        if self.layer_drop is not None:
            self.layer_drop.uninstall()
            self.layer_drop = None
        if self.sparse is not None:
            self.sparse.remove_hooks()
