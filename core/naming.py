"""Names of fine-tuned models: `ft:<base>:<team>:<suffix>:<job short id>`."""

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _clean(part: str) -> str:
    return _UNSAFE.sub("-", part).strip("-") or "x"


def fine_tuned_model_name(base: str, team_name: str, suffix: str | None, job_id: str) -> str:
    """The public name a finished job's adapter is served under."""
    short = job_id.split("-", 1)[-1][:8]
    return f"ft:{_clean(base)}:{_clean(team_name)}:{_clean(suffix) if suffix else ''}:{short}"


def adapter_name(suffix: str | None, job_id: str) -> str:
    """The registry name a job publishes under: its suffix, or the job id."""
    return _clean(suffix) if suffix else job_id
