"""Sparse fine-tuning of the base's own decoder linears: BitFit, named modules, or top-k entries.

Lifecycle in a recipe: construct on the freshly loaded causal LM, before any checkpoint is restored
(4-bit bases loaded with `quantization_skip_modules`); attach the method's adapter; call
`make_trainable()` (peft freezes the base when it attaches); build the optimizer with
`params_without_weight_decay()` in groups of weight decay 0; call `after_optimizer_step(optimizer)`
after each `optimizer.step()`; checkpoint with `state_dict()` / `load_state_dict()` (after the
optimizer is built); write the artifact files with `save(folder)`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.schemas.peft_methods import SparseSpec
from worker.formats.sparse_deltas import ParamDelta, SparseEntries, write_sparse_deltas
from worker.model_parts import decoder_linears, is_4bit
from worker.training.techniques.sparse_selection import chosen_linears, quantization_skip_modules

__all__ = ["SparseTraining", "quantization_skip_modules"]


def _compute_in_float32(linear: torch.nn.Linear) -> None:
    """Keep a linear whose weight trains in float32 on a half-precision base (bfloat16 would round
    Adam's small updates away): its input is cast up and its output back to the input's dtype."""
    if linear.weight.dtype not in (torch.float16, torch.bfloat16):
        return
    linear.float()  # in place: the Parameter objects stay the same
    run = linear.forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return run(x.float(), *args, **kwargs).to(x.dtype)

    linear.forward = forward


class SparseTraining:
    """Trains a sparse part of the base's decoder linears, beside (or instead of) a method's adapter.

    - bitfit: every decoder linear's bias; a linear without one gets a zero-initialised bias
      (4-bit linears included: bitsandbytes' Linear4bit adds `self.bias` in its forward);
    - modules: every weight and bias of the linears that `spec.modules` names;
    - top_k: for `spec.warmup_steps` optimizer steps the candidate weights only collect |grad| (their
      gradient is zeroed, so they do not move); then the `density` share of candidate entries with the
      largest sum is chosen over all candidates at once, and only those entries train (gradient mask).
    On a half-precision base, the linears whose weights train (modules, top_k) are kept in float32.
    Parameter names are relative to the causal LM, e.g. `model.layers.0.mlp.down_proj.weight`.
    """

    def __init__(self, causal_lm: torch.nn.Module, spec: SparseSpec) -> None:
        self.spec = spec
        self.kind = spec.kind
        self.steps_done = 0
        self.warmup_done = self.kind != "top_k"
        self._params: dict[str, torch.nn.Parameter] = {}
        self._added: set[str] = set()
        self._originals: dict[str, torch.Tensor] = {}
        self._stats: dict[str, torch.Tensor] = {}
        self._indices: dict[str, torch.Tensor] = {}
        self._hooks: list = []
        linears = chosen_linears(decoder_linears(causal_lm), spec)
        if self.kind == "bitfit":
            self._choose_biases(linears)
        else:
            self._choose_weights(linears)
        self.candidate_entries = sum(p.numel() for p in self._params.values())
        if self.kind == "top_k":
            self._k = max(1, round(spec.density * self.candidate_entries))
            self._stats = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self._params.items()}

    def _choose_biases(self, linears: dict[str, torch.nn.Linear]) -> None:
        for module_name, linear in linears.items():
            name = f"{module_name}.bias"
            if linear.bias is None:
                dtype = linear.compute_dtype if is_4bit(linear) else linear.weight.dtype
                linear.bias = torch.nn.Parameter(
                    torch.zeros(linear.out_features, dtype=dtype or torch.float32, device=linear.weight.device)
                )
                self._added.add(name)
            else:
                self._originals[name] = linear.bias.detach().to("cpu", copy=True)
            self._params[name] = linear.bias

    def _choose_weights(self, linears: dict[str, torch.nn.Linear]) -> None:
        quantized = [name for name, linear in linears.items() if is_4bit(linear)]
        if quantized:
            raise ValueError(
                f"sparse kind {self.kind!r} trains base weights, but {quantized[0]} was quantized to 4-bit; "
                "load the base with BitsAndBytesConfig(llm_int8_skip_modules=quantization_skip_modules(...))"
            )
        for module_name, linear in linears.items():
            _compute_in_float32(linear)
            parts = [("weight", linear.weight)]
            if self.kind == "modules" and linear.bias is not None:
                parts.append(("bias", linear.bias))
            for part, param in parts:
                name = f"{module_name}.{part}"
                self._params[name] = param
                if self.kind == "modules":
                    self._originals[name] = param.detach().to("cpu", copy=True)

    # ---- training ------------------------------------------------------------------------------

    @property
    def trainable_entries(self) -> int:
        """How many parameter entries train: for top_k only the chosen (or to be chosen) entries."""
        return self._k if self.kind == "top_k" else self.candidate_entries

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters to give the optimizer (for top_k every candidate weight, masked)."""
        return list(self._params.values())

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The same parameters by name relative to the causal LM."""
        return dict(self._params)

    def added_parameters(self) -> list[torch.nn.Parameter]:
        """The biases bitfit added (not part of the base: count them as trained, not as base size)."""
        return [self._params[name] for name in sorted(self._added)]

    def params_without_weight_decay(self) -> list[torch.nn.Parameter]:
        """Parameters that need weight decay 0: AdamW's decay would move their masked entries (top_k)."""
        return list(self._params.values()) if self.kind == "top_k" else []

    def make_trainable(self) -> None:
        """Set requires_grad on the chosen parameters and, for top_k, install the gradient mask.

        Call after the method's adapter is attached (peft freezes every base parameter). Idempotent.
        The set of parameters that require a gradient never changes afterwards (top_k masks entries
        instead), so optimizers and checkpoints built over it stay valid across the warm-up.
        """
        for param in self._params.values():
            param.requires_grad_(True)
        if self.kind == "top_k" and not self._hooks:
            self._hooks = [param.register_hook(self._mask_hook(name)) for name, param in self._params.items()]

    def _mask_hook(self, name: str):
        def mask(grad: torch.Tensor) -> torch.Tensor:
            if not self.warmup_done:
                self._stats[name].add_(grad.detach().abs())
                return torch.zeros_like(grad)
            # Only the chosen entries keep their gradient; built from indices to hold no dense mask.
            indices = self._indices[name]
            kept = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
            kept.view(-1)[indices] = grad.reshape(-1)[indices]
            return kept
        return mask

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Count an optimizer step; at the end of top_k's warm-up, choose the entries that train.

        Given the optimizer, the candidates' state is cleared then, so that Adam's bias correction
        starts with the first real gradient rather than counting the warm-up's zero gradients.
        """
        self.steps_done += 1
        if not self.warmup_done and self.steps_done >= self.spec.warmup_steps:
            self._choose_top_k()
            if optimizer is not None:
                for param in self._params.values():
                    optimizer.state.pop(param, None)

    def _choose_top_k(self) -> None:
        names = list(self._stats)
        device = self._stats[names[0]].device
        per_param = [torch.topk(self._stats[n].view(-1), min(self._k, self._stats[n].numel())) for n in names]
        values = torch.cat([top.values.to(device) for top in per_param])
        winners = torch.topk(values, self._k).indices.sort().values
        offsets = torch.tensor([0] + [top.values.numel() for top in per_param], device=device).cumsum(0)
        for i, name in enumerate(names):
            positions = winners[(winners >= offsets[i]) & (winners < offsets[i + 1])] - offsets[i]
            indices = per_param[i].indices[positions.to(per_param[i].indices.device)]
            self._set_mask(name, indices.sort().values)
        self._stats = {}
        self.warmup_done = True

    def _set_mask(self, name: str, indices: torch.Tensor) -> None:
        param = self._params[name]
        self._indices[name] = indices.to(param.device)
        self._originals[name] = param.detach().view(-1)[self._indices[name]].clone()

    def remove_hooks(self) -> None:
        """Remove the gradient-mask hooks (top_k)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ---- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors (for safetensors) to continue exactly: step count, warm-up statistics or the chosen
        mask with its original and current values, and the current values of what trains (a resumed
        base starts from the original weights)."""
        state = {
            "steps_done": torch.tensor(self.steps_done, dtype=torch.int64),
            "warmup_done": torch.tensor(self.warmup_done),
        }
        for name, stats in self._stats.items():
            state[f"stats/{name}"] = stats.detach().cpu().clone()
        for name, param in self._params.items():
            if self.kind != "top_k":
                state[f"value/{name}"] = param.detach().cpu().clone()
            elif self.warmup_done:
                state[f"indices/{name}"] = self._indices[name].cpu().clone()
                state[f"original/{name}"] = self._originals[name].cpu().clone()
                state[f"value/{name}"] = param.detach().view(-1)[self._indices[name]].cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned, on a freshly loaded base with this same spec."""
        try:
            self._load(state)
        except KeyError as missing:
            raise ValueError(f"sparse state does not fit this model and spec: it lacks {missing}") from None

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        self.steps_done = int(state["steps_done"])
        self.warmup_done = bool(state["warmup_done"])
        expected = {"steps_done", "warmup_done"}
        with torch.no_grad():
            for name, param in self._params.items():
                if self.kind != "top_k":
                    param.copy_(state[f"value/{name}"])
                    expected.add(f"value/{name}")
                elif not self.warmup_done:
                    self._stats[name].copy_(state[f"stats/{name}"])
                    expected.add(f"stats/{name}")
                else:
                    # The originals come from the state: the parameter may already hold trained values.
                    indices = self._indices[name] = state[f"indices/{name}"].to(param.device)
                    self._originals[name] = state[f"original/{name}"].to(param.device)
                    param.view(-1)[indices] = state[f"value/{name}"].to(param.device, param.dtype)
                    expected.update(f"{part}/{name}" for part in ("indices", "original", "value"))
        if self.warmup_done:
            self._stats = {}
        unexpected = sorted(set(state) - expected)
        if unexpected:
            raise ValueError(f"sparse state does not fit this model and spec: unexpected {unexpected[:3]}")
        self.make_trainable()

    # ---- artifact ------------------------------------------------------------------------------

    def deltas(self) -> dict[str, ParamDelta]:
        """What changed, per parameter: dense deltas (bitfit, modules), or the chosen entries (top_k)."""
        deltas = {}
        for name, param in self._params.items():
            trained = param.detach()
            if name in self._added:
                deltas[name] = ParamDelta(trained.float().cpu(), added=True)
            elif self.kind != "top_k":
                deltas[name] = ParamDelta(trained.cpu().float() - self._originals[name].float())
            elif self.warmup_done and self._indices[name].numel():
                indices = self._indices[name]
                values = trained.view(-1)[indices].float() - self._originals[name].float()
                deltas[name] = ParamDelta(SparseEntries(indices.cpu(), values.cpu(), tuple(param.shape)))
        return deltas

    def save(self, folder: Path | str) -> dict:
        """Write `sparse_config.json` and `sparse_deltas.safetensors` into `folder`; return the config."""
        return write_sparse_deltas(folder, self.kind, self.deltas(), self.candidate_entries, self.spec.modules)
