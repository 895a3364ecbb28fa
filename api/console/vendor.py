"""JavaScript libraries the console uses, served from the Python packages that ship them (nothing is copied)."""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

PLOTLY_JS = ("plotly", "package_data/plotly.min.js")
"""The `plotly` wheel carries plotly.js; the console draws its charts with it."""


def package_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / relative


@lru_cache(maxsize=4)
def gzipped(path: Path) -> bytes:
    """The file's bytes, gzip-compressed once per process (plotly.js is 4.8 MB, about 1.4 MB compressed)."""
    return gzip.compress(path.read_bytes(), compresslevel=6, mtime=0)
