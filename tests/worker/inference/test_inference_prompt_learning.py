"""Prompt tuning, P-tuning and prefix tuning: virtual tokens or prefix keys/values at prefill, then decoding
in the shared batch; token for token as peft's own `generate`, and within the context limit."""

from __future__ import annotations

import pytest

from tests.support.peft_artifacts import reference_model, save_peft_artifact
from tests.worker.inference.conftest import assert_changes_logits, check_against_references
from worker.inference.engine import GenerationRequest, InferenceEngine

NEW_TOKENS = 10
VIRTUAL_TOKENS = {"prompt": 5, "ptune": 4, "prefix": 6}


@pytest.fixture(scope="module")
def prompt_dirs(tiny_model_dir, tmp_path_factory):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    root = tmp_path_factory.mktemp("prompt-learning")
    configs = {
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS["prompt"]),
        "ptune": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS["ptune"],
                                     encoder_hidden_size=32),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS["prefix"]),
    }
    noise = {"prompt": 3.0, "ptune": 3.0, "prefix": 3.0}
    return {name: save_peft_artifact(tiny_model_dir, root / name, config, seed=50 + i, noise=noise[name])
            for i, (name, config) in enumerate(configs.items())}


@pytest.fixture(scope="module")
def prompt_engine(tiny_model_dir, prompt_dirs, lora_dirs):
    with InferenceEngine(tiny_model_dir, quantization="none", max_loaded_adapters=4, max_lora_rank=16) as engine:
        for name, folder in {**prompt_dirs, "A": lora_dirs["A"]}.items():
            engine.adapters.ensure(name, lambda folder=folder: folder)
        yield engine


def test_prompt_learning_equals_peft_alone_and_mixed(prompt_engine, tiny_model_dir, prompt_dirs, lora_dirs, prompts):
    references = {name: reference_model(tiny_model_dir, folder) for name, folder in prompt_dirs.items()}
    references["A"] = reference_model(tiny_model_dir, lora_dirs["A"])
    references[None] = reference_model(tiny_model_dir, None)
    for name in prompt_dirs:
        assert_changes_logits(references[name], references[None], prompts[0])
    jobs = [("prompt", prompts[0]), ("prefix", prompts[1]), ("A", prompts[2]), ("ptune", prompts[3]),
            (None, prompts[0]), ("prefix", prompts[2]), ("prompt", prompts[1])]
    check_against_references(prompt_engine, references, jobs, NEW_TOKENS)
    assert prompt_engine.adapters.status("prefix").kind == "prefix_tuning"


def test_virtual_tokens_count_against_the_context(prompt_engine):
    context = prompt_engine.max_context()
    assert prompt_engine.max_context("prefix") == context - VIRTUAL_TOKENS["prefix"]
    assert prompt_engine.max_context("prompt") == context - VIRTUAL_TOKENS["prompt"]
    fits_base = GenerationRequest([5] * (context - 2), "prompt", max_new_tokens=2)
    with pytest.raises(ValueError, match="virtual tokens"):
        prompt_engine.submit(fits_base)
    assert prompt_engine.adapters.status("prompt").in_use == 0  # the refused request let go of its adapter
