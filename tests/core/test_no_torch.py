"""The API image stays slim: nothing in api/ or core/ imports torch, transformers or peft."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def test_api_and_core_import_without_heavy_packages():
    modules = [m.name for pkg in ("core", "api") for m in pkgutil.walk_packages([str(REPO / pkg)], prefix=f"{pkg}.")]
    assert "api.main" in modules and "core.settings" in modules
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "from api.main import create_app; create_app()\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"heavy modules imported: {done.stdout}"
