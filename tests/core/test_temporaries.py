"""Temporaries and the sweep: a dead process's leftovers go at once, a live one's stay, unreferenced objects age out."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from core.temporaries import TEMP_PREFIX, instance_name, sweep_temporaries, sweep_unreferenced, temp_key


def _dead_instance() -> str:
    """The instance name a process that has exited had."""
    child = subprocess.run([sys.executable, "-c", "from core.temporaries import instance_name; print(instance_name())"],
                           capture_output=True, text=True, check=True, cwd=os.getcwd())
    return child.stdout.strip()


def test_a_dead_process_leaves_nothing_after_a_sweep_and_a_live_one_keeps_its_work(api):
    from core.settings import get_settings
    from core.storage import get_storage

    storage, settings = get_storage(), get_settings()
    dead = _dead_instance()
    with storage.open_write(f"{TEMP_PREFIX}/{dead}/file-1.jsonl") as fh:
        fh.write(b"half an upload")
    (settings.data_dir / TEMP_PREFIX / dead).mkdir(parents=True)
    (settings.data_dir / TEMP_PREFIX / dead / "upload").write_bytes(b"half an archive")
    with storage.open_write(temp_key("file-2.jsonl")) as fh:
        fh.write(b"an upload in progress")
    other_host = f"{TEMP_PREFIX}/elsewhere~123~456"
    with storage.open_write(f"{other_host}/x") as fh:
        fh.write(b"another machine's upload")

    assert sweep_temporaries(storage, settings) == 2
    assert not storage.exists(f"{TEMP_PREFIX}/{dead}") and not (settings.data_dir / TEMP_PREFIX / dead).exists()
    assert storage.exists(temp_key("file-2.jsonl")) and storage.exists(other_host)
    old = time.time() - settings.orphan_age_seconds - 10
    os.utime(storage.path(f"{other_host}/x"), (old, old))
    os.utime(storage.path(other_host), (old, old))
    assert sweep_temporaries(storage, settings) == 1 and not storage.exists(other_host)
    assert instance_name() in {p.name for p in storage.path(TEMP_PREFIX).iterdir()}


def test_unreferenced_objects_are_removed_once_old_and_referenced_ones_never(api):
    from core.settings import get_settings
    from core.storage import get_storage
    from tests.support.datasets import chat_lines, to_jsonl

    storage, settings = get_storage(), get_settings()
    kept = api.client.post("/v1/files", headers=api.headers(), data={"purpose": "fine-tune"},
                           files={"file": ("t.jsonl", to_jsonl(chat_lines(2)))}).json()["id"]
    for key in ("files/file-orphan.jsonl", "adapters/adapter-orphan/adapter_config.json",
                "checkpoints/ftjob-x/step-00000002/state.json"):
        with storage.open_write(key) as fh:
            fh.write(b"{}")
    assert sweep_unreferenced(storage, settings) == 0  # too young: maybe a commit is under way
    old = time.time() - settings.orphan_age_seconds - 10
    for path in storage.root.rglob("*"):
        os.utime(path, (old, old))
    assert sweep_unreferenced(storage, settings) == 3
    assert storage.exists(f"files/{kept}.jsonl")
    assert not storage.exists("files/file-orphan.jsonl") and not storage.exists("adapters/adapter-orphan")
    assert api.client.get(f"/v1/files/{kept}/content", headers=api.headers()).status_code == 200
