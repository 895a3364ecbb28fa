"""Publish a trained adapter: PEFT folder plus our metadata file, then the registry row."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.ids import new_id
from core.models import Adapter, BaseModelRecord, File, Job, Team
from core.naming import adapter_name, fine_tuned_model_name
from core.registry import new_adapter_row
from core.schemas.peft_methods import RANKED_METHODS
from core.schemas.training import techniques_of
from core.storage import LocalStorage, folder_sha256, sha256_file

METADATA_FILE = "patchbay.json"


def _tokenizer_hashes(base_dir: Path) -> dict[str, str | None]:
    tokenizer = base_dir / "tokenizer.json"
    template = None
    jinja = base_dir / "chat_template.jinja"
    if jinja.exists():
        template = jinja.read_text()
    elif (base_dir / "tokenizer_config.json").exists():
        template = json.loads((base_dir / "tokenizer_config.json").read_text()).get("chat_template")
    return {
        "tokenizer_sha256": sha256_file(tokenizer) if tokenizer.exists() else None,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None,
    }


def write_metadata(adapter_dir: Path, *, job: Job, base: BaseModelRecord, files: dict[str, File | None],
                   result_metrics: dict[str, Any], quantization: dict[str, Any], trainable_params: int,
                   total_params: int, base_params: int, probe: dict[str, Any]) -> dict[str, Any]:
    """Write `patchbay.json` beside the artifact files and return it.

    `base_params` is the base model's logical size (adapter excluded); `probe` holds logits of the trained
    in-memory model (worker.training.artifacts.probe_record) so any process can verify the artifact.
    """
    file_hashes = {p.name: sha256_file(p) for p in sorted(adapter_dir.iterdir()) if p.is_file()}
    metadata = {
        "format": "patchbay.adapter/v1",
        "job_id": job.id,
        "base_model": {"id": base.id, "sha256": base.sha256, **_tokenizer_hashes(Path(base.path))},
        "quantization": quantization,
        "training_config": job.resolved,
        "metrics": result_metrics,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "base_params": base_params,
        "probe": probe,
        "datasets": {kind: ({"id": f.id, "sha256": f.sha256} if f else None) for kind, f in files.items()},
        "files": file_hashes,
    }
    (adapter_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return metadata


def publish_adapter(session: Session, storage: LocalStorage, *, job: Job, adapter_dir: Path,
                    metadata: dict[str, Any]) -> Adapter:
    """Store the folder and add the registry row (the caller commits both with the job outcome)."""
    team = session.get(Team, job.team_id)
    adapter_id = new_id("adapter")
    key = f"adapters/{adapter_id}"
    storage.put_dir(key, adapter_dir)
    sha, size = folder_sha256(adapter_dir)
    peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    targets = peft_config.get("target_modules") or []
    peft_spec = (job.resolved or {}).get("peft", {})
    method = peft_spec.get("method", "lora")
    return new_adapter_row(
        session,
        id=adapter_id,
        team_id=job.team_id,
        name=adapter_name(job.suffix, job.id),
        fine_tuned_model=fine_tuned_model_name(job.model, team.name, job.suffix, job.id),
        base_model=job.model,
        job_id=job.id,
        storage_key=key,
        method=method,
        techniques=techniques_of(peft_spec),
        rank=(peft_config.get("target_r") or peft_config.get("r")) if method in RANKED_METHODS else None,
        target_modules=sorted(targets) if isinstance(targets, list) else [targets],
        trainable_params=metadata["trainable_params"],
        base_params=metadata["base_params"],
        bytes=size,
        sha256=sha,
        metrics=metadata["metrics"],
        status="ready",
        source="job",
    )
