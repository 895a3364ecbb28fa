"""Take in an uploaded adapter archive, torch-free: unpack it safely, check it against a base model, stamp it.

`inspect_adapter_archive` is meant to run in a checker process: its arguments, its result and every
exception it raises pickle. `write_import_metadata` then writes the accepted folder's `patchbay.json`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from core.adapter_check import AdapterCheckError, AdapterSummary, check_adapter_folder
from core.adapter_metadata import AdapterMetadata, base_model_stamp, write_adapter_metadata
from core.archives import ArchiveError, extract_archive
from core.models import BaseModelRecord

__all__ = ["AdapterCheckError", "ArchiveError", "InspectedAdapter", "inspect_adapter_archive",
           "write_import_metadata"]


@dataclass(frozen=True)
class InspectedAdapter:
    """An accepted upload: `folder` (under `dest`) holds only the kept adapter files; `summary` what they hold."""

    folder: Path
    summary: AdapterSummary


def inspect_adapter_archive(archive: Path, dest: Path, base_dir: Path, *, max_bytes: int,
                            max_rank: int) -> InspectedAdapter:
    """Unpack `archive` into `dest/adapter` and check it against the base model folder `base_dir`.

    Raises ArchiveError (unreadable or unsafe archive) or AdapterCheckError (`.check` names the failed check) for
    anything wrong with the upload, leaving nothing under `dest`. A broken base folder raises other errors.
    """
    folder = extract_archive(archive, dest, max_bytes)
    try:
        summary = check_adapter_folder(folder, base_dir, max_rank)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return InspectedAdapter(folder=folder, summary=summary)


def write_import_metadata(inspected: InspectedAdapter, base: BaseModelRecord, base_params: int) -> AdapterMetadata:
    """Write the accepted folder's `patchbay.json` (imports are LoRA; no job, training or probe)."""
    summary = inspected.summary
    return write_adapter_metadata(inspected.folder, AdapterMetadata(
        source="import", base_model=base_model_stamp(base), method="lora", rank=summary.rank, alpha=summary.alpha,
        trainable_params=summary.trainable_params, base_params=base_params))
