"""One engine serves every adapter kind at once: a batch mixing them all and the base gives each row the same
tokens as running it alone, and its decode steps really mix the kinds."""

from __future__ import annotations

import shutil

import torch

from tests.support.peft_artifacts import add_sparse_deltas, save_bottleneck, save_peft_artifact
from worker.inference.engine import GenerationRequest, InferenceEngine

NEW_TOKENS = 8


def test_every_kind_in_one_batch_equals_each_alone(tiny_model_dir, lora_dirs, prompts, tmp_path):
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, PrefixTuningConfig, PromptTuningConfig

    folders = {
        "lora": lora_dirs["A"],
        "adalora": save_peft_artifact(tiny_model_dir, tmp_path / "adalora", AdaLoraConfig(
            init_r=4, total_step=10, target_modules=["q_proj", "up_proj"]), seed=81, noise=1.0),
        "ia3": save_peft_artifact(tiny_model_dir, tmp_path / "ia3", IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), seed=82, noise=2.0,
            around_one=True),
        "loha": save_peft_artifact(tiny_model_dir, tmp_path / "loha", LoHaConfig(r=4, target_modules=["v_proj"]),
                                   seed=83, noise=0.6),
        "prompt": save_peft_artifact(tiny_model_dir, tmp_path / "prompt", PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3), seed=84, noise=3.0),
        "prefix": save_peft_artifact(tiny_model_dir, tmp_path / "prefix", PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4), seed=85, noise=3.0),
        "bottleneck": save_bottleneck(tmp_path / "bottleneck", hidden=64, layers=2, seed=86),
    }
    sparse = tmp_path / "lora+sparse"
    shutil.copytree(lora_dirs["B"], sparse)
    add_sparse_deltas(sparse, {"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64) * 0.3})
    folders["lora+sparse"] = sparse
    with InferenceEngine(tiny_model_dir, quantization="none", max_loaded_adapters=len(folders), max_lora_rank=16,
                         max_batch_size=16) as engine:
        for name, folder in folders.items():
            engine.adapters.ensure(name, lambda folder=folder: folder)
        jobs = [(name, prompts[i % len(prompts)]) for i, name in enumerate([*folders, None, "prefix", "ia3"])]
        alone = [engine.generate(GenerationRequest(p, a, NEW_TOKENS, temperature=0.0)).token_ids for a, p in jobs]
        before = engine.stats()
        handles = [engine.submit(GenerationRequest(p, a, NEW_TOKENS, temperature=0.0)) for a, p in jobs]
        together = [h.result().token_ids for h in handles]
        stats = engine.stats()
    assert together == alone
    assert stats["mixed_adapter_steps"] > before["mixed_adapter_steps"]
    assert stats["max_distinct_adapters"] >= len(folders)
    assert len({tuple(tokens) for tokens in alone}) >= 4  # the kinds really answer differently
