"""The layers import downwards only: core/ is shared by every role, api/ never reaches into the worker,
and training and inference meet only in the neutral worker modules (formats, device, model parts, loading).

Every import statement counts, including the lazy ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROLES = ("api", "worker", "demo", "patchbay_cli")
FORBIDDEN = {
    "core": set(ROLES),
    "api": {"worker", "demo", "patchbay_cli"},
    "worker/training": {"worker.inference"},
    "worker/inference": {"worker.training"},
    "worker/formats": {"worker.training", "worker.inference"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def reaches(module: str, forbidden: str) -> bool:
    return module == forbidden or module.startswith(forbidden + ".")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_no_higher_layer(layer):
    files = sorted((REPO / layer).rglob("*.py"))
    assert files, f"{layer}/ has no Python files"
    wrong = [f"{path.relative_to(REPO)}:{line} imports {module}"
             for path in files for line, module in imported_modules(path)
             if any(reaches(module, forbidden) for forbidden in FORBIDDEN[layer])]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_lazy_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def run():\n    from worker.tasks import train\n    import api.main\n")
    assert [module for _, module in imported_modules(sample)] == ["worker.tasks", "api.main"]
