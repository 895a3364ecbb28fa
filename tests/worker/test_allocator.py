"""The worker's allocator: tcmalloc preloaded where installed, a command re-executed once, or the system's malloc."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from worker import allocator


def test_environment_preloads_tcmalloc_first_and_quiets_its_large_allocation_reports(tmp_path, monkeypatch):
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.touch()
    monkeypatch.setattr(allocator, "TCMALLOC_PATHS", (tmp_path / "absent.so", library))
    env = allocator.allocator_environment({"LD_PRELOAD": f"/lib/other.so {library}", "PATH": "/bin"}, "tcmalloc")
    assert env["LD_PRELOAD"] == f"{library}:/lib/other.so" and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    assert allocator.allocator_environment({"PATH": "/bin"}, "system") == {"PATH": "/bin"}


def test_without_tcmalloc_installed_nothing_is_preloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "TCMALLOC_PATHS", (tmp_path / "absent.so",))
    assert allocator.allocator_environment({"PATH": "/bin"}, "tcmalloc") == {"PATH": "/bin"}
    allocator.reexec_with_allocator("tcmalloc")  # returns: nothing to preload


SCRIPT = textwrap.dedent("""
    import os, sys
    from worker.allocator import reexec_with_allocator, running_tcmalloc
    print("start", os.getpid(), running_tcmalloc(), flush=True)
    reexec_with_allocator(sys.argv[1])
    print("run", os.getpid(), running_tcmalloc(), sys.argv[1:], flush=True)
""")


@pytest.mark.skipif(allocator.tcmalloc_library() is None, reason="libtcmalloc-minimal4 is not installed")
@pytest.mark.parametrize("choice", ["tcmalloc", "system"])
def test_a_command_reexecutes_itself_once_on_tcmalloc_with_its_arguments(tmp_path, choice):
    script = tmp_path / "command.py"
    script.write_text(SCRIPT)
    env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", allocator.REEXECUTED)}
    env["PYTHONPATH"] = os.getcwd()
    done = subprocess.run([sys.executable, str(script), choice, "--flag"], env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    lines = done.stdout.splitlines()
    tcmalloc = choice == "tcmalloc"
    expected_starts = 2 if tcmalloc else 1
    assert [line.split()[0] for line in lines] == ["start"] * expected_starts + ["run"]
    pids = {line.split()[1] for line in lines}
    assert len(pids) == 1  # the same process, its image replaced
    assert lines[-1].split()[2] == str(tcmalloc) and lines[-1].endswith(f"['{choice}', '--flag']")
