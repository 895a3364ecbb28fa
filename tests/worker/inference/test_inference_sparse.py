"""Sparse deltas beside a method's files: every part of the combined artifact is served, as training applies it."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.support.peft_artifacts import add_sparse_deltas, reference_model, save_peft_artifact
from tests.worker.inference.conftest import assert_changes_logits, check_against_references
from worker.formats.files import AdapterLoadError
from worker.inference.engine import InferenceEngine

NEW_TOKENS = 10


def _few_entries(shape, count, seed):
    generator = torch.Generator().manual_seed(seed)
    delta = torch.zeros(shape).flatten()
    delta[torch.randperm(delta.numel(), generator=generator)[:count]] = torch.randn(count, generator=generator) * 2
    return delta.view(shape)


@pytest.fixture(scope="module")
def sparse_dirs(tiny_model_dir, lora_dirs, tmp_path_factory):
    from peft import HRAConfig, IA3Config

    root = tmp_path_factory.mktemp("sparse")
    generator = torch.Generator().manual_seed(71)
    lora = root / "lora+sparse"
    shutil.copytree(lora_dirs["C"], lora)
    add_sparse_deltas(lora, {
        "model.layers.0.mlp.down_proj.weight": torch.randn(64, 128, generator=generator) * 0.3,  # stored dense
        "model.layers.1.self_attn.q_proj.weight": _few_entries((64, 64), 20, 72),  # stored as indices
        "model.layers.0.self_attn.o_proj.bias": torch.randn(64, generator=generator),  # BitFit: added bias
    }, added=("model.layers.0.self_attn.o_proj.bias",))
    ia3 = save_peft_artifact(tiny_model_dir, root / "ia3+sparse", IA3Config(
        target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]), seed=73, noise=2.0,
        around_one=True)
    add_sparse_deltas(ia3, {
        "model.layers.1.mlp.down_proj.weight": torch.randn(64, 128, generator=generator) * 0.3,
        "model.layers.1.self_attn.v_proj.bias": torch.randn(32, generator=generator),
    }, added=("model.layers.1.self_attn.v_proj.bias",))
    hra = save_peft_artifact(tiny_model_dir, root / "hra+sparse", HRAConfig(r=4, target_modules=["q_proj"]),
                             seed=74, noise=1.0)
    add_sparse_deltas(hra, {"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=generator)})
    bitfit = root / "lora+bitfit"
    shutil.copytree(lora_dirs["A"], bitfit)
    add_sparse_deltas(bitfit, {f"model.layers.{i}.mlp.up_proj.bias": torch.randn(128, generator=generator) * 2
                               for i in range(2)}, added=tuple(f"model.layers.{i}.mlp.up_proj.bias" for i in range(2)),
                      kind="bitfit")
    return {"lora": lora, "ia3": ia3, "hra": hra, "bitfit": bitfit}


def test_combined_artifacts_equal_training_alone_and_mixed(tiny_model_dir, sparse_dirs, lora_dirs, prompts):
    references = {name: reference_model(tiny_model_dir, folder, sparse=True) for name, folder in sparse_dirs.items()}
    references["B"] = reference_model(tiny_model_dir, lora_dirs["B"])
    references[None] = reference_model(tiny_model_dir, None)
    without_sparse = reference_model(tiny_model_dir, sparse_dirs["ia3"])
    assert_changes_logits(references["ia3"], without_sparse, prompts[0])  # the sparse part matters
    with InferenceEngine(tiny_model_dir, quantization="none", max_loaded_adapters=5, max_lora_rank=16) as engine:
        for name, folder in {**sparse_dirs, "B": lora_dirs["B"]}.items():
            engine.adapters.ensure(name, lambda folder=folder: folder)
        assert engine.adapters.status("lora").kind == "lora+sparse"
        jobs = [("lora", prompts[0]), ("ia3", prompts[1]), ("B", prompts[2]), ("hra", prompts[3]),
                (None, prompts[1]), ("bitfit", prompts[0]), ("lora", prompts[2])]
        check_against_references(engine, references, jobs, NEW_TOKENS)


def test_bias_deltas_on_a_4bit_base_equal_training(tiny_model_dir, sparse_dirs, lora_dirs, prompts):
    references = {"bitfit": reference_model(tiny_model_dir, sparse_dirs["bitfit"], quantization="nf4-dq", sparse=True),
                  None: reference_model(tiny_model_dir, None, quantization="nf4-dq")}
    with InferenceEngine(tiny_model_dir, quantization="nf4-dq", max_loaded_adapters=1, max_lora_rank=16) as engine:
        engine.adapters.ensure("bitfit", lambda: sparse_dirs["bitfit"])
        check_against_references(engine, references, [("bitfit", prompts[0]), (None, prompts[1])], NEW_TOKENS)


def test_sparse_deltas_that_do_not_fit_are_refused(tiny_model_dir, sparse_dirs, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(sparse_dirs["bitfit"], folder)
    add_sparse_deltas(folder, {"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 64)})
    with InferenceEngine(tiny_model_dir, quantization="none", max_loaded_adapters=1, max_lora_rank=16) as engine:
        with pytest.raises(AdapterLoadError, match="does not fit"):
            engine.adapters.ensure("bad", lambda: folder)
