"""IA3 adapters serve per batch row (gains gathered per row), exactly as plain peft computes them."""

from __future__ import annotations

import pytest

from tests.support.peft_artifacts import greedy_tokens, reference_model, save_peft_artifact
from tests.worker.inference.conftest import check_against_references
from worker.inference.engine import InferenceEngine

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def ia3_dir(tiny_model_dir, tmp_path_factory):
    from peft import IA3Config

    config = IA3Config(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"])
    return save_peft_artifact(tiny_model_dir, tmp_path_factory.mktemp("ia3") / "I", config, seed=21, noise=2.0,
                              around_one=True)


@pytest.mark.parametrize("quantization", ["none", "nf4-dq"])
def test_ia3_equals_peft_alone_and_mixed_with_lora(quantization, tiny_model_dir, ia3_dir, lora_dirs, prompts):
    references = {
        "I": reference_model(tiny_model_dir, ia3_dir, quantization=quantization),
        "A": reference_model(tiny_model_dir, lora_dirs["A"], quantization=quantization),
        None: reference_model(tiny_model_dir, None, quantization=quantization),
    }
    with InferenceEngine(tiny_model_dir, quantization=quantization, max_loaded_adapters=2, max_lora_rank=16) as engine:
        engine.adapters.ensure("I", lambda: ia3_dir)
        engine.adapters.ensure("A", lambda: lora_dirs["A"])
        status = engine.adapters.status("I")
        assert status.kind == "ia3" and status.rank is None
        jobs = [("I", prompts[0]), ("A", prompts[1]), (None, prompts[2]), ("I", prompts[3])]
        expected = check_against_references(engine, references, jobs, NEW_TOKENS)
    assert expected[0] != greedy_tokens(references[None], prompts[0], NEW_TOKENS, engine.eos_token_ids)
