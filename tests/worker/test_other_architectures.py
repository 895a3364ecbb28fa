"""Other base architectures (and a tokenizer of their own) train with QLoRA and serve with the batched engine,
matching plain peft."""

from __future__ import annotations

import pytest

from tests.support.reference import peft_greedy_chat
from tests.support.tiny_model import build_tiny_other_architecture, build_tiny_qwen2
from tests.worker.training.test_training_recipe import RecordingContext, make_job
from worker.inference.engine import GenerationRequest, InferenceEngine
from worker.training.recipe import run_training

QUESTION = "What colour is item 7?"


@pytest.mark.parametrize("architecture", ["qwen2", "mistral", "qwen2-own-tokenizer"])
def test_qlora_trains_and_serves(architecture, tmp_path):
    if architecture == "qwen2-own-tokenizer":
        model_dir = build_tiny_qwen2(tmp_path / architecture)
    else:
        model_dir = build_tiny_other_architecture(tmp_path / architecture, architecture)
    result = run_training(make_job(model_dir, tmp_path / "work", method="qlora"), RecordingContext(tmp_path / "ckpt"))
    assert result.metrics["train_loss"] < result.metrics["first_train_loss"]
    assert result.quantization["linear4bit"] == result.quantization["decoder_linears"] == 14
    with InferenceEngine(model_dir, quantization="none", max_loaded_adapters=1) as engine:
        engine.adapters.ensure("tuned", lambda: result.adapter_dir)
        prompt = engine.encode_chat([{"role": "user", "content": QUESTION}])
        served = engine.generate(GenerationRequest(prompt_ids=prompt, adapter="tuned", max_new_tokens=12,
                                                   temperature=0)).text
    assert served == peft_greedy_chat(model_dir, result.adapter_dir, QUESTION, 12)
