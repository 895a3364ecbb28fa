"""Every PEFT kind's artifact as peft itself writes and reloads it (LoRA/DoRA, AdaLoRA, IA3, LoHa, LoKr,
HRA, prompt/prefix/p-tuning).

Files: `adapter_config.json` (the peft config, with its `peft_type`) and `adapter_model.safetensors`
(never pickle). Training writes them with `write_peft_artifact` and rebuilds a trained model with
`load_peft_artifact`; serving reads them with the per-kind readers (`lora`, `adalora`, `ia3`,
`weight_deltas`, `prompt_learning`), which check them against the served base.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from torch import nn


def write_peft_artifact(model: PeftModel, folder: Path | str) -> Path:
    """Write the adapter of `model` into `folder` as peft's `save_pretrained(safe_serialization=True)`."""
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def load_peft_artifact(base: nn.Module, folder: Path | str) -> PeftModel:
    """`base` wrapped with the adapter saved in `folder`, frozen (peft's `from_pretrained`)."""
    return PeftModel.from_pretrained(base, str(folder), is_trainable=False)
