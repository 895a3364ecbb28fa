"""The peft config chosen for each method: AdaLoRA's schedule clipping, IA3's default modules, prompt init."""

from __future__ import annotations

import pytest
from peft import AdaLoraConfig, PromptTuningInit

from core.schemas.training import Hyperparameters, PeftConfigSpec, resolve_training
from tests.support.tiny_training import load_tiny
from worker.training.methods.peft_configs import adalora_config, adalora_schedule, ia3_modules, peft_config_for


def _resolved(n_examples: int = 40, **peft):
    return resolve_training(Hyperparameters(n_epochs=1, batch_size=4), PeftConfigSpec(**peft), n_examples, seed=0)


@pytest.mark.parametrize("tinit, tfinal, total, expected", [
    (10, 20, 100, (10, 20)),  # already leaves a budgeting phase
    (5, 5, 6, (0, 5)),
    (0, 9, 3, (0, 2)),
    (3, 0, 1, (0, 0)),
])
def test_adalora_schedule_keeps_a_budgeting_phase(tinit, tfinal, total, expected):
    assert adalora_schedule(tinit, tfinal, total) == expected
    new_tinit, new_tfinal = expected
    assert new_tinit < total - new_tfinal


def test_adalora_config_uses_the_real_step_count():
    config = _resolved(method="adalora", r=4, adalora={"init_r": 6, "tinit": 4, "tfinal": 4})
    peft_config = adalora_config(config, total_steps=5)
    assert isinstance(peft_config, AdaLoraConfig)
    assert (peft_config.total_step, peft_config.tinit, peft_config.tfinal) == (5, 0, 4)
    assert (peft_config.init_r, peft_config.target_r, peft_config.lora_alpha) == (6, 4, 8.0)


def test_ia3_defaults_follow_peft_then_the_decoder_linears(tiny_model_dir):
    model = load_tiny(tiny_model_dir)
    config = _resolved(method="ia3")
    assert ia3_modules(config, model) == (["k_proj", "v_proj", "down_proj"], ["down_proj"])
    model.config.model_type = "an-architecture-peft-does-not-know"
    assert ia3_modules(config, model) == (["k_proj", "v_proj", "down_proj"], ["down_proj"])
    chosen = _resolved(method="ia3", ia3={"target_modules": ["q_proj", "down_proj"]})
    assert ia3_modules(chosen, model) == (["q_proj", "down_proj"], ["down_proj"])


def test_prompt_tuning_from_text_reads_the_base_tokenizer(tiny_model_dir):
    model = load_tiny(tiny_model_dir)
    config = _resolved(method="prompt_tuning", prompt={"num_virtual_tokens": 4, "init_text": "Be brief."})
    peft_config = peft_config_for(config, model, base_model_path=str(tiny_model_dir), total_steps=10)
    assert peft_config.prompt_tuning_init == PromptTuningInit.TEXT
    assert peft_config.tokenizer_name_or_path == str(tiny_model_dir)
