"""Shared fixtures: the tiny test model, real services and the in-process API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.support.services", "tests.support.api_app", "tests.support.s3"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer and chat template, as a safetensors folder."""
    from tests.support.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted from the bundled GGUF once per machine."""
    from worker.base_models import convert_smollm2

    cache = Path(os.environ.get("PATCHBAY_TEST_CACHE", Path.home() / ".cache" / "patchbay-tests"))
    return convert_smollm2(cache / "smollm2-135m-instruct")
