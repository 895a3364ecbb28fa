"""Temporaries: what a process writes before its database row commits, and the sweep that removes leftovers.

An upload streams to a temporary key `tmp/<instance>/...` in storage and is renamed to its final key just
before its row commits; an import is unpacked and checked in a local scratch folder `<data_dir>/tmp/<instance>`.
`<instance>` names the writing process (host, pid and the pid's start time), so a sweep can tell the
leftovers of a dead process (kill -9, crash) from the work of a live one, at once on the same host and after
`orphan_age_seconds` for other hosts. The sweep also removes stored objects that no row refers to.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from functools import lru_cache
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import session_scope
from core.models import Adapter, Checkpoint, File
from core.settings import Settings
from core.storage import Storage, newest_mtime

log = logging.getLogger("patchbay.sweep")
TEMP_PREFIX = "tmp"
_SEPARATOR = "~"


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks (Linux), or None when it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_runs(pid: int, started: str) -> bool:
    if Path("/proc").is_dir():
        return _process_start(pid) == started
    return pid_alive(pid)


@lru_cache
def instance_name() -> str:
    """This process's name among writers of temporaries: `<host>~<pid>~<start>`."""
    pid = os.getpid()
    return _SEPARATOR.join((socket.gethostname(), str(pid), _process_start(pid) or str(int(time.time()))))


def temp_key(name: str) -> str:
    """A storage key private to this process, for an object whose row has not committed yet."""
    return f"{TEMP_PREFIX}/{instance_name()}/{name}"


def commit_into_place(session: Session, storage: Storage, temp: str, key: str) -> None:
    """Rename the temporary `temp` to its final `key`, then commit the row that names it.

    If the commit fails the object is removed again; a crash between the two leaves an object no row
    refers to, which `sweep_unreferenced` removes.
    """
    storage.rename(temp, key)
    try:
        session.commit()
    except BaseException:
        storage.delete(key)
        raise


def scratch_dir(settings: Settings) -> Path:
    """A local folder private to this process, under the data dir."""
    folder = settings.data_dir.resolve() / TEMP_PREFIX / instance_name()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _abandoned(name: str, mtime: float, max_age: float) -> bool:
    """Whether the temporaries of instance `name` belong to no live process."""
    host, _, rest = name.partition(_SEPARATOR)
    pid, _, started = rest.partition(_SEPARATOR)
    if name == instance_name():
        return False
    if host == socket.gethostname() and pid.isascii() and pid.isdigit():
        return not _pid_runs(int(pid), started)
    return time.time() - mtime > max_age


def sweep_temporaries(storage: Storage, settings: Settings) -> int:
    """Remove the temporaries of dead processes, in storage and in the local scratch area. Returns how many."""
    removed = 0
    for key, mtime in storage.children(TEMP_PREFIX):
        if _abandoned(key.rsplit("/", 1)[1], mtime, settings.orphan_age_seconds):
            storage.delete(key)
            removed += 1
    local = settings.data_dir.resolve() / TEMP_PREFIX
    for folder in (local.iterdir() if local.is_dir() else []):
        try:
            abandoned = _abandoned(folder.name, newest_mtime(folder), settings.orphan_age_seconds)
        except FileNotFoundError:
            continue
        if abandoned:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def sweep_unreferenced(storage: Storage, settings: Settings) -> int:
    """Remove stored files, adapters and checkpoints that no row refers to and nobody touched for a while."""
    cutoff = time.time() - settings.orphan_age_seconds
    with session_scope() as session:
        referenced = set(session.scalars(select(File.storage_key)))
        referenced |= set(session.scalars(select(Adapter.storage_key).where(Adapter.status == "ready")))
        referenced |= set(session.scalars(select(Checkpoint.storage_key)))
    candidates = storage.children("files") + storage.children("adapters")
    for job_folder, _ in storage.children("checkpoints"):
        candidates += storage.children(job_folder)
    removed = 0
    for key, mtime in candidates:
        if key not in referenced and mtime < cutoff:
            storage.delete(key)
            removed += 1
    return removed


def sweep(storage: Storage, settings: Settings) -> int:
    """Both sweeps; logs what was removed."""
    removed = sweep_temporaries(storage, settings) + sweep_unreferenced(storage, settings)
    if removed:
        log.info("removed %d orphaned temporary or unreferenced object(s)", removed)
    return removed
