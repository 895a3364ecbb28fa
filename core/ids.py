"""Public ids (`file-…`, `ftjob-…`) and timestamps."""

import secrets
import time


def new_id(prefix: str) -> str:
    """A random id like `file-3f9c…` (24 hex characters)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> float:
    """Unix time in seconds."""
    return time.time()
