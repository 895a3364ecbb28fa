"""The techniques inside the recipe, combined with methods: artifacts reload exactly in a fresh process,
trainable counts are exact, and a resumed run continues exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from core.schemas.training import Hyperparameters
from tests.support.artifact_check import reload_in_fresh_process
from tests.worker.training.test_training_recipe import RecordingContext, make_job
from worker.training.recipe import run_training

CASES = {
    "lora+bitfit": dict(method="lora", r=4, sparse={"kind": "bitfit"}, quantization="none"),
    "lora+top_k": dict(method="lora", r=4, sparse={"kind": "top_k", "density": 0.05, "warmup_steps": 2},
                       quantization="none"),
    "ia3+modules-nf4": dict(method="ia3", learning_rate=3e-2, quantization="nf4-dq",
                            sparse={"kind": "modules", "modules": ["layers.1.mlp.down_proj"]}),
    "lora+layer_drop+llrd": dict(method="lora", r=4, layer_drop=0.5, layerwise_lr_decay=0.5, quantization="none"),
    "adalora+layer_drop": dict(method="adalora", r=2, adalora={"init_r": 4, "tinit": 1, "tfinal": 1},
                               layer_drop=0.25, learning_rate=3e-2, quantization="none"),
}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("techniques")
    results, cases = {}, []
    for name, options in CASES.items():
        options = {"learning_rate": 3e-3, **options}
        job = make_job(tiny_model_dir, work / name, n_examples=4, hyper=Hyperparameters(n_epochs=6, batch_size=4),
                       max_steps=6, **options)
        results[name] = {"result": run_training(job, RecordingContext(work / f"{name}-store"))}
        cases.append({"name": name, "dir": str(results[name]["result"].adapter_dir),
                      "quantization": options["quantization"], "probe": results[name]["result"].probe})
    for name, measured in reload_in_fresh_process(tiny_model_dir, cases, work).items():
        results[name].update(measured)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_technique_trains_and_reloads_to_the_trained_logits(runs, name):
    run, result = runs[name], runs[name]["result"]
    tolerance = 5e-4 if CASES[name]["quantization"] != "none" else 1e-4
    assert result.metrics["train_loss"] < result.metrics["first_train_loss"]
    assert run["reload_diff"] <= tolerance, run
    assert run["adapter_effect"] > 10 * tolerance, run
    assert run["argmax"] == result.probe["argmax"]
    has_sparse = "sparse" in CASES[name]
    assert (result.adapter_dir / "sparse_config.json").is_file() == has_sparse
    assert (result.adapter_dir / "sparse_deltas.safetensors").is_file() == has_sparse


@pytest.mark.slow
def test_top_k_counts_and_stores_only_the_chosen_entries(runs):
    result = runs["lora+top_k"]["result"]
    config = json.loads((result.adapter_dir / "sparse_config.json").read_text())
    lora = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_params = sum(t.numel() for t in lora.values())
    chosen = round(0.05 * config["candidate_entries"])
    assert config["trainable_entries"] == chosen
    assert sum(p["nnz"] for p in config["parameters"].values()) <= chosen
    assert result.trainable_params == lora_params + chosen
    assert result.base_params == runs["lora+layer_drop+llrd"]["result"].base_params


@pytest.mark.slow
def test_bitfit_biases_count_as_trained_not_as_base(runs):
    bitfit, plain = runs["lora+bitfit"]["result"], runs["lora+layer_drop+llrd"]["result"]
    assert bitfit.base_params == plain.base_params
    config = json.loads((bitfit.adapter_dir / "sparse_config.json").read_text())
    assert config["kind"] == "bitfit" and all(p["added"] for p in config["parameters"].values())
    assert len(config["parameters"]) == 14  # every decoder linear of the 2-layer model


def test_resumed_top_k_with_layer_drop_and_llrd_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    common = dict(n_examples=12, hyper=Hyperparameters(n_epochs=2, batch_size=3), max_seq_length=64,
                  checkpoint_every_steps=3, method="lora", r=4, quantization="none", learning_rate=3e-3,
                  sparse={"kind": "top_k", "density": 0.02, "warmup_steps": 2}, layer_drop=0.3,
                  layerwise_lr_decay=0.7)
    full_ctx = RecordingContext(tmp_path / "store-full")
    full = run_training(make_job(tiny_model_dir, tmp_path / "full", **common), full_ctx)
    assert sorted(full_ctx.checkpoints) == [3, 6]
    resumed_ctx = RecordingContext(tmp_path / "store-resumed", resume_from=(3, full_ctx.checkpoints[3]))
    resumed = run_training(make_job(tiny_model_dir, tmp_path / "resumed", **common), resumed_ctx)
    assert resumed.metrics["train_loss"] == pytest.approx(full.metrics["train_loss"], abs=1e-5)
    for file_name in ("adapter_model.safetensors", "sparse_deltas.safetensors"):
        expected, actual = load_file(full.adapter_dir / file_name), load_file(resumed.adapter_dir / file_name)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)
