"""LoHa, LoKr and HRA adapters serve as dense weight deltas materialized at load, matching plain peft;
a 4-bit server refuses them (they change the dense base weights)."""

from __future__ import annotations

import pytest

from tests.support.peft_artifacts import greedy_tokens, reference_model, save_peft_artifact
from tests.worker.inference.conftest import assert_changes_logits, check_against_references
from worker.formats.files import AdapterLoadError
from worker.inference.engine import InferenceEngine

NEW_TOKENS = 10
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj", "gate_proj"]


@pytest.fixture(scope="module")
def delta_dirs(tiny_model_dir, tmp_path_factory):
    from peft import HRAConfig, LoHaConfig, LoKrConfig

    root = tmp_path_factory.mktemp("weight-deltas")
    return {
        "loha": save_peft_artifact(tiny_model_dir, root / "loha", LoHaConfig(r=4, alpha=8, target_modules=TARGETS),
                                   seed=41, noise=0.6),
        "lokr": save_peft_artifact(tiny_model_dir, root / "lokr", LoKrConfig(r=4, alpha=8, target_modules=TARGETS),
                                   seed=42, noise=0.6),
        "hra": save_peft_artifact(tiny_model_dir, root / "hra", HRAConfig(r=4, target_modules=TARGETS),
                                  seed=43, noise=1.0),
    }


def test_weight_delta_kinds_equal_peft_alone_and_mixed(tiny_model_dir, delta_dirs, lora_dirs, prompts):
    references = {name: reference_model(tiny_model_dir, folder) for name, folder in delta_dirs.items()}
    references["A"] = reference_model(tiny_model_dir, lora_dirs["A"])
    references[None] = reference_model(tiny_model_dir, None)
    for name in delta_dirs:
        assert_changes_logits(references[name], references[None], prompts[0])
    with InferenceEngine(tiny_model_dir, quantization="none", max_loaded_adapters=4, max_lora_rank=16) as engine:
        for name, folder in {**delta_dirs, "A": lora_dirs["A"]}.items():
            engine.adapters.ensure(name, lambda folder=folder: folder)
        assert engine.adapters.status("lokr").kind == "lokr"
        jobs = [("loha", prompts[0]), ("lokr", prompts[1]), ("A", prompts[2]), (None, prompts[0]),
                ("hra", prompts[3]), ("loha", prompts[2])]
        expected = check_against_references(engine, references, jobs, NEW_TOKENS)
        base = greedy_tokens(references[None], prompts[0], NEW_TOKENS, engine.eos_token_ids)
    assert expected[0] != base


def test_a_4bit_server_refuses_weight_delta_kinds(tiny_model_dir, delta_dirs):
    with InferenceEngine(tiny_model_dir, quantization="nf4-dq", max_loaded_adapters=1, max_lora_rank=8) as engine:
        with pytest.raises(AdapterLoadError, match="need a full-precision base"):
            engine.adapters.ensure("hra", lambda: delta_dirs["hra"])
        assert engine.adapters.status("hra").state == "errored"
