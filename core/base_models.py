"""The base-model registry: ids that map to local Hugging Face folders."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy.orm import Session

from core.models import BaseModelRecord
from core.storage import folder_sha256


class BaseModelError(ValueError):
    """A folder that cannot serve as a base model."""


def weights_sha256(folder: Path) -> str:
    """One digest over every safetensors file of the folder (name and content)."""
    return folder_sha256(folder, "*.safetensors")[0]


def check_model_folder(folder: Path) -> None:
    """Refuse folders that are not a safetensors causal-LM checkpoint with a tokenizer."""
    if not (folder / "config.json").is_file():
        raise BaseModelError(f"{folder} has no config.json")
    if not list(folder.glob("*.safetensors")):
        raise BaseModelError(f"{folder} has no .safetensors weights (pickled weights are refused)")
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        raise BaseModelError(f"{folder} has no tokenizer")
    config = json.loads((folder / "config.json").read_text())
    if config.get("auto_map"):
        raise BaseModelError(f"{folder} needs custom code (auto_map); trust_remote_code is always off")


def register_base_model(session: Session, model_id: str, folder: Path) -> BaseModelRecord:
    """Add or update a base model after checking its folder."""
    folder = folder.resolve()
    check_model_folder(folder)
    record = session.get(BaseModelRecord, model_id) or BaseModelRecord(id=model_id, path=str(folder))
    record.path = str(folder)
    record.sha256 = weights_sha256(folder)
    session.add(record)
    session.flush()
    return record


def has_chat_template(folder: Path) -> bool:
    """Whether the model folder's tokenizer carries a chat template (needed for chat datasets)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))
