"""Adapters saved by plain peft code, and archives of them, for import and serving tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def save_peft_lora(model_dir: Path, dest: Path, *, r: int = 8, targets=("q_proj", "v_proj"), seed: int = 0,
                   scale: float = 1.0, **config) -> Path:
    """Save a randomly initialised (non-zero) LoRA adapter for the model in `model_dir`.

    `scale` multiplies lora_B so the adapter moves outputs visibly; `config` goes to LoraConfig.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets if isinstance(targets, str)
                                            else list(targets), init_lora_weights=False, **config))
    if scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def tar_gz(folder: Path, *, extra: dict[str, bytes] | None = None, prefix: str = "adapter") -> bytes:
    """A tar.gz of the folder's files under `prefix/`, plus raw extra members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for path in sorted(folder.iterdir()):
            tf.add(path, arcname=f"{prefix}/{path.name}")
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
