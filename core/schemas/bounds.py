"""Bounds shared by request shapes: every free-form field has a documented limit.

Names, module lists and step counts are bounded so a stored spec stays small and every integer fits
its column; floats refuse NaN and Infinity (`allow_inf_nan=False` in each request model's config).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

MAX_MODULES = 64
"""Entries in a list of module names (target_modules, sparse.modules, ia3 lists)."""
MAX_STEPS = 1_000_000
"""The largest step count or interval a job may name."""
INT64_MAX = 2**63 - 1

ModuleName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
"""A module name or suffix, e.g. `q_proj` or `layers.3.mlp.down_proj`."""
ModuleList = Annotated[list[ModuleName], Field(max_length=MAX_MODULES)]
StepCount = Annotated[int, Field(ge=1, le=MAX_STEPS)]
ObjectId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
"""An id we issued (`file-…`, `adapter-…`)."""
