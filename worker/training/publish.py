"""Publish a trained adapter: PEFT folder plus our metadata file, then the registry row."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.adapter_metadata import AdapterMetadata, DatasetStamp, base_model_stamp, write_adapter_metadata
from core.ids import new_id
from core.models import Adapter, BaseModelRecord, File, Job, Team
from core.naming import adapter_name, fine_tuned_model_name
from core.registry import publish_version
from core.schemas.peft_methods import RANKED_METHODS
from core.schemas.training import techniques_of
from core.storage import Storage, folder_sha256
from worker.formats.files import ADAPTER_CONFIG_FILE


@dataclass(frozen=True)
class _PeftFacts:
    """What the job's spec and the saved adapter_config.json say about the artifact."""

    method: str
    rank: int | None
    alpha: float | None
    target_modules: list[str]


def _peft_facts(adapter_dir: Path, job: Job) -> _PeftFacts:
    config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
    method = (job.resolved or {}).get("peft", {}).get("method", "lora")
    ranked = method in RANKED_METHODS
    targets = config.get("target_modules") or []
    return _PeftFacts(method=method, rank=(config.get("target_r") or config.get("r")) if ranked else None,
                      alpha=config.get("lora_alpha") if ranked else None,
                      target_modules=sorted(targets) if isinstance(targets, list) else [targets])


def write_metadata(adapter_dir: Path, *, job: Job, base: BaseModelRecord, files: dict[str, File | None],
                   result_metrics: dict[str, Any], quantization: dict[str, Any], trainable_params: int,
                   total_params: int, base_params: int, probe: dict[str, Any]) -> AdapterMetadata:
    """Write `patchbay.json` beside the artifact files and return it.

    `base_params` is the base model's logical size (adapter excluded); `probe` holds logits of the trained
    in-memory model (worker.training.artifacts.probe_record) so any process can verify the artifact.
    """
    facts = _peft_facts(adapter_dir, job)
    return write_adapter_metadata(adapter_dir, AdapterMetadata(
        source="job", job_id=job.id, base_model=base_model_stamp(base), method=facts.method, rank=facts.rank,
        alpha=facts.alpha, trainable_params=trainable_params, total_params=total_params, base_params=base_params,
        quantization=quantization, training_config=job.resolved, metrics=result_metrics, probe=probe,
        datasets={kind: (DatasetStamp(id=f.id, sha256=f.sha256) if f else None) for kind, f in files.items()}))


def publish_adapter(session: Session, storage: Storage, *, job: Job, adapter_dir: Path,
                    metadata: AdapterMetadata) -> Adapter:
    """Store the folder and add the registry version (the caller commits both with the job outcome).

    A job that continued a fine-tuned model records that version as the new one's parent.
    """
    team = session.get(Team, job.team_id)
    adapter_id = new_id("adapter")
    key = f"adapters/{adapter_id}"
    storage.put_dir(key, adapter_dir)
    sha, size = folder_sha256(adapter_dir)
    facts = _peft_facts(adapter_dir, job)
    return publish_version(
        session,
        id=adapter_id,
        team_id=job.team_id,
        name=adapter_name(job.suffix, job.id),
        fine_tuned_model=fine_tuned_model_name(job.model, team.name, job.suffix, job.id),
        base_model=job.model,
        job_id=job.id,
        storage_key=key,
        method=facts.method,
        techniques=techniques_of((job.resolved or {}).get("peft", {})),
        rank=facts.rank,
        target_modules=facts.target_modules,
        trainable_params=metadata.trainable_params,
        base_params=metadata.base_params,
        bytes=size,
        sha256=sha,
        metrics=metadata.metrics,
        status="ready",
        source="job",
        parent_id=((job.resolved or {}).get("start_adapter") or {}).get("id"),
    )
