"""peft-backed methods: LoRA family, LoHa/LoKr/HRA, IA3 and prompt learning; AdaLoRA's budget schedule."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import torch
from peft import PeftModel, PeftType, get_peft_model_state_dict, set_peft_model_state_dict

from worker.formats.files import read_safetensors
from worker.formats.peft_artifact import write_peft_artifact
from worker.training.methods.base import AttachedMethod

ADAPTER = "default"


class PeftMethod(AttachedMethod):
    """A method implemented by peft; `model` is the `PeftModel`."""

    model: PeftModel

    def __init__(self, name: str, model: PeftModel, base_params: int) -> None:
        super().__init__(name, model, model.get_base_model(), base_params)
        peft_config = model.peft_config[ADAPTER]
        self.prompt_learning = bool(peft_config.is_prompt_learning)
        if peft_config.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):
            self.virtual_tokens_in_logits = peft_config.num_virtual_tokens

    def adapter_disabled(self) -> AbstractContextManager:
        """peft's own switch: every tuner layer (and any virtual tokens) off."""
        return self.model.disable_adapter()

    def save(self, folder: Path) -> Path:
        """What peft's `save_pretrained(safe_serialization=True)` writes (`worker.formats.peft_artifact`)."""
        return write_peft_artifact(self.model, folder)

    def load_adapter_weights(self, folder: Path) -> None:
        """Load a saved artifact's `adapter_model.safetensors` with peft's `set_peft_model_state_dict`.

        Refused unless it holds exactly the tensors this model saves, shape for shape, covering every
        trainable parameter, and the model saves them back unchanged once loaded.
        """
        saved = read_safetensors(Path(folder))
        self._check_artifact_fits(saved, get_peft_model_state_dict(self.model, adapter_name=ADAPTER))
        set_peft_model_state_dict(self.model, saved, adapter_name=ADAPTER)
        loaded = get_peft_model_state_dict(self.model, adapter_name=ADAPTER)
        differ = [name for name, tensor in saved.items()
                  if not torch.equal(loaded[name], tensor.to(loaded[name].device, loaded[name].dtype))]
        if differ:
            raise ValueError(f"{len(differ)} saved tensor(s) did not load as saved, e.g. {differ[0]}")


class AdaLoraMethod(PeftMethod):
    """AdaLoRA: SVD-form LoRA whose ranks are pruned to a budget during training.

    Adds peft's orthogonality regulariser of P (lora_A) and Q (lora_B) to the loss and runs the
    budget allocator after every optimizer step.
    """

    @property
    def _tuner(self):
        return self.model.base_model  # the AdaLoraModel

    @property
    def _peft_config(self):
        return self.model.peft_config[ADAPTER]

    def extra_loss(self) -> torch.Tensor | None:
        """orth_reg_weight x the mean over P and Q matrices of ||P P^T - I||_F (||Q^T Q - I||_F), as peft."""
        weight = self._peft_config.orth_reg_weight
        if weight == 0:
            return None
        norms = []
        for name, param in self._tuner.model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and ADAPTER in name and param.requires_grad:
                cov = param @ param.T if "lora_A" in name else param.T @ param
                eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                norms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
        if not norms:
            return None
        return weight * torch.stack(norms).mean()

    def load_adapter_weights(self, folder: Path) -> None:
        """Refused: the saved ranks are pruned to a pattern that a new budget schedule cannot restart from."""
        raise ValueError("adalora cannot start from a saved adapter: its ranks were pruned to a per-module pattern")

    def after_optimizer_step(self, step: int) -> None:
        """Update the importance scores and mask the ranks over budget (peft's `update_and_allocate`)."""
        self._tuner.update_and_allocate(step)

    def finalize(self) -> None:
        """Zero the pruned ranks once more: the optimizer may have moved them since the last masking,
        and the saved artifact drops them."""
        rank_pattern = self._peft_config.rank_pattern
        if rank_pattern:
            self._tuner.rankallocator.mask_using_rank_pattern(self._tuner.model, rank_pattern)

    def _extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        allocator = self._tuner.rankallocator
        tensors = {}
        for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            for name, tensor in getattr(allocator, kind).items():
                tensors[f"{kind}/{name}"] = tensor.detach().to("cpu").contiguous()
        return tensors, {"rank_pattern": self._peft_config.rank_pattern}

    def _load_extra_state(self, tensors: dict[str, torch.Tensor], data: dict) -> None:
        allocator = self._tuner.rankallocator
        allocator.reset_ipt()
        device = next(p.device for _, p in self.named_trainable())
        for key, tensor in tensors.items():
            kind, _, name = key.partition("/")
            getattr(allocator, kind)[name] = tensor.to(device)
        self._peft_config.rank_pattern = data.get("rank_pattern")
