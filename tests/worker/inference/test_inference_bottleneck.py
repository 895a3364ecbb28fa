"""Bottleneck adapters (our format) serve per batch row through hooks, exactly as training computes them."""

from __future__ import annotations

import pytest

from tests.support.peft_artifacts import reference_model, save_bottleneck
from tests.worker.inference.conftest import assert_changes_logits, check_against_references
from worker.formats.files import AdapterLoadError
from worker.inference.engine import InferenceEngine

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def bottleneck_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bottleneck")
    return {
        "both": save_bottleneck(root / "both", hidden=64, layers=2, activation="gelu", scaling=2.0, seed=61),
        "mlp": save_bottleneck(root / "mlp", hidden=64, layers=2, placement=("mlp",), activation="silu", seed=62),
        "wide": save_bottleneck(root / "wide", hidden=96, layers=2, seed=63),
    }


@pytest.mark.parametrize("quantization", ["none", "nf4-dq"])
def test_bottleneck_equals_reference_alone_and_mixed(quantization, tiny_model_dir, bottleneck_dirs, lora_dirs,
                                                    prompts):
    references = {name: reference_model(tiny_model_dir, bottleneck_dirs[name], quantization=quantization,
                                        bottleneck=True) for name in ("both", "mlp")}
    references["A"] = reference_model(tiny_model_dir, lora_dirs["A"], quantization=quantization)
    references[None] = reference_model(tiny_model_dir, None, quantization=quantization)
    assert_changes_logits(references["both"], references[None], prompts[0])
    with InferenceEngine(tiny_model_dir, quantization=quantization, max_loaded_adapters=3, max_lora_rank=16) as engine:
        for name in ("both", "mlp"):
            engine.adapters.ensure(name, lambda name=name: bottleneck_dirs[name])
        engine.adapters.ensure("A", lambda: lora_dirs["A"])
        assert engine.adapters.status("both").kind == "bottleneck_adapter"
        jobs = [("both", prompts[0]), ("A", prompts[1]), ("mlp", prompts[2]), (None, prompts[3]), ("both", prompts[1])]
        check_against_references(engine, references, jobs, NEW_TOKENS)
        with pytest.raises(AdapterLoadError, match="hidden_size=96"):
            engine.adapters.ensure("wide", lambda: bottleneck_dirs["wide"])
