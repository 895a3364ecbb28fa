"""Inspect an uploaded adapter archive, torch-free: unpack it safely and check it against a base model.

Meant to run in a worker process: the argument, the result and every exception it raises pickle.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from core.adapter_check import AdapterCheckError, AdapterSummary, check_adapter_folder
from core.archives import ArchiveError, extract_archive

__all__ = ["AdapterCheckError", "ArchiveError", "InspectedAdapter", "inspect_adapter_archive"]


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
