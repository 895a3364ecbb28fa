"""`patchbay.json`: our torch-free metadata beside every stored adapter's files.

One writer for every source: job publishing (worker/training/publish.py) and `POST /v1/adapters/import`
both build an `AdapterMetadata` and call `write_adapter_metadata`, so every stored adapter carries the
same keys; fields that a source does not know are null. Nothing serves from this file: the registry
row is the truth, and this file is provenance for a downloaded folder (what base, what training,
which files) plus the probe logits that let any process verify a trained artifact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from core.models import BaseModelRecord
from core.storage import sha256_file

METADATA_FILE = "patchbay.json"
FORMAT = "patchbay.adapter/v1"


class BaseModelStamp(BaseModel):
    """Which base model an adapter belongs to, and the tokenizer and chat template it was made with."""

    id: str
    sha256: str | None = None
    tokenizer_sha256: str | None = None
    chat_template_sha256: str | None = None


class DatasetStamp(BaseModel):
    """A file a job trained or validated on."""

    id: str
    sha256: str | None = None


class AdapterMetadata(BaseModel):
    """The contents of `patchbay.json`. `files` (sha256 of every other file in the folder) is filled by the writer."""

    model_config = ConfigDict(extra="allow")  # read files written by newer versions without losing keys

    format: Literal["patchbay.adapter/v1"] = FORMAT
    source: Literal["job", "import"] = "job"  # the defaults read files that jobs wrote before they recorded these
    job_id: str | None = None
    base_model: BaseModelStamp
    method: str | None = None
    rank: int | None = None
    alpha: float | None = None
    trainable_params: int
    total_params: int | None = None
    base_params: int | None = None
    quantization: dict[str, Any] | None = None
    training_config: dict[str, Any] | None = None
    metrics: dict[str, Any] = {}
    probe: dict[str, Any] | None = None
    datasets: dict[str, DatasetStamp | None] = {}
    files: dict[str, str] = {}


def base_model_stamp(base: BaseModelRecord) -> BaseModelStamp:
    """The stamp of a registered base model, hashing its tokenizer and chat template files."""
    folder = Path(base.path)
    tokenizer = folder / "tokenizer.json"
    template = None
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "tokenizer_config.json").exists():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    return BaseModelStamp(
        id=base.id, sha256=base.sha256,
        tokenizer_sha256=sha256_file(tokenizer) if tokenizer.exists() else None,
        chat_template_sha256=hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None)


def write_adapter_metadata(folder: Path, metadata: AdapterMetadata) -> AdapterMetadata:
    """Write `patchbay.json` into `folder`, with the sha256 of every other file there; return what was written."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != METADATA_FILE}
    written = metadata.model_copy(update={"files": files})
    (folder / METADATA_FILE).write_text(json.dumps(written.model_dump(), indent=2, sort_keys=True))
    return written


def read_adapter_metadata(folder: Path) -> AdapterMetadata:
    """The `patchbay.json` of an adapter folder (raises FileNotFoundError or pydantic's ValidationError)."""
    return AdapterMetadata.model_validate_json((folder / METADATA_FILE).read_text())
