"""Every `peft.method` trains in the recipe, publishes safetensors + config, and reloads in a fresh process
to the logits of the trained model in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.schemas.training import Hyperparameters
from tests.support.artifact_check import reload_in_fresh_process
from tests.worker.training.test_training_recipe import RecordingContext, make_job
from worker.training.recipe import run_training

FULL_PRECISION_TOLERANCE = 1e-4
# Reloading re-quantizes the same weights deterministically, so the measured difference is 0 on CPU; the
# tolerance still allows for kernels that differ between processes (e.g. another bitsandbytes backend).
NF4_TOLERANCE = 5e-4
LEARNING_RATES = {"adalora": 1e-2, "ia3": 3e-2, "prefix_tuning": 1e-2, "prompt_tuning": 3e-2, "p_tuning": 3e-3,
                  "bottleneck_adapter": 3e-3}
PEFT_TYPES = {"qlora": "LORA", "lora": "LORA", "dora": "LORA", "adalora": "ADALORA", "loha": "LOHA", "lokr": "LOKR",
              "hra": "HRA", "ia3": "IA3", "prefix_tuning": "PREFIX_TUNING", "prompt_tuning": "PROMPT_TUNING",
              "p_tuning": "P_TUNING", "bottleneck_adapter": "BOTTLENECK_ADAPTER"}
FULL_PRECISION_CASES = {
    "lora": {}, "dora": {}, "adalora": {}, "loha": {}, "lokr": {}, "hra": {}, "ia3": {},
    "prefix_tuning": {}, "prompt_tuning": {"prompt": {"num_virtual_tokens": 6, "init_text": "Name a colour."}},
    "p_tuning": {"prompt": {"num_virtual_tokens": 6, "encoder": "lstm", "encoder_hidden_size": 32}},
    "bottleneck_adapter": {},
}
NF4_CASES = {
    "qlora": {}, "adalora": {"r": 4, "adalora": {"init_r": 8, "tinit": 1, "tfinal": 1}}, "ia3": {},
    "prefix_tuning": {"prompt": {"num_virtual_tokens": 5, "prefix_projection": True, "encoder_hidden_size": 16}},
    "prompt_tuning": {}, "p_tuning": {},
    "bottleneck_adapter": {"bottleneck": {"size": 8, "placement": ["mlp"], "activation": "relu", "scaling": 2.0}},
}

def train_cases(tiny_model_dir: Path, work: Path, cases: dict[str, dict], quantization: str) -> dict[str, dict]:
    """Train each method briefly; return its result and what a fresh process measured on its artifact."""
    results, reload_cases = {}, []
    for method, options in cases.items():
        job = make_job(tiny_model_dir, work / method, n_examples=4, hyper=Hyperparameters(n_epochs=6, batch_size=4),
                       method=method, quantization=quantization, max_steps=6,
                       learning_rate=LEARNING_RATES.get(method, 3e-3), **options)
        results[method] = {"result": run_training(job, RecordingContext(work / f"{method}-store"))}
        reload_cases.append({"name": method, "dir": str(results[method]["result"].adapter_dir),
                             "quantization": quantization, "probe": results[method]["result"].probe})
    for method, measured in reload_in_fresh_process(tiny_model_dir, reload_cases, work).items():
        results[method].update(measured)
    return results


@pytest.fixture(scope="module")
def full_precision_runs(tiny_model_dir, tmp_path_factory):
    return train_cases(tiny_model_dir, tmp_path_factory.mktemp("methods-full"), FULL_PRECISION_CASES, "none")


@pytest.fixture(scope="module")
def nf4_runs(tiny_model_dir, tmp_path_factory):
    return train_cases(tiny_model_dir, tmp_path_factory.mktemp("methods-nf4"), NF4_CASES, "nf4-dq")


def check_run(run: dict, method: str, tolerance: float) -> None:
    result = run["result"]
    assert result.steps == 6
    assert result.metrics["train_loss"] < result.metrics["first_train_loss"]
    files = sorted(p.name for p in result.adapter_dir.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert all(name.endswith((".safetensors", ".json", ".md")) for name in files), files
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPES[method]
    assert 0 < result.trainable_params < result.base_params < result.total_params
    assert result.base_params + result.trainable_params <= result.total_params  # AdaLoRA adds frozen ranknums
    assert len(result.probe["logits"]) == len(result.probe["input_ids"]) == 16
    assert len(result.probe["vocab_ids"]) == 64
    print(f"{method}: reload difference {run['reload_diff']:.2e}, adapter effect {run['adapter_effect']:.2e}")
    assert run["reload_diff"] <= tolerance, run
    assert run["adapter_effect"] > 10 * tolerance, run  # the comparison would catch a lost adapter
    assert run["argmax"] == result.probe["argmax"]


@pytest.mark.slow  # the runs behind it take 15-55 s together, depending on how busy the two cores are
@pytest.mark.parametrize("method", sorted(FULL_PRECISION_CASES))
def test_full_precision_method_trains_and_reloads(full_precision_runs, method):
    check_run(full_precision_runs[method], method, FULL_PRECISION_TOLERANCE)
    assert full_precision_runs[method]["result"].quantization["linear4bit"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(NF4_CASES))
def test_nf4_method_trains_and_reloads(nf4_runs, method):
    check_run(nf4_runs[method], method, NF4_TOLERANCE)
    assert nf4_runs[method]["result"].quantization["linear4bit"] == 14


@pytest.mark.slow
def test_base_params_count_4bit_weights_at_full_size(full_precision_runs, nf4_runs):
    assert nf4_runs["qlora"]["result"].base_params == full_precision_runs["lora"]["result"].base_params


@pytest.mark.slow
def test_ranked_methods_target_every_decoder_linear_with_all_linear(full_precision_runs):
    linears = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for method in ("adalora", "loha", "lokr", "hra"):
        keys = load_file(full_precision_runs[method]["result"].adapter_dir / "adapter_model.safetensors")
        for layer in (0, 1):
            hit = {name for name in linears if any(f"layers.{layer}." in k and f".{name}." in k for k in keys)}
            assert hit == linears, (method, layer)


@pytest.mark.slow
def test_adalora_artifact_is_pruned_and_its_delta_follows_the_documented_formula(full_precision_runs):
    """dW = B @ (A * E) * lora_alpha / (init_r + 1e-5), with the pruned A, E, B as saved (peft's ranknum
    stays init_r after reloading a pruned adapter)."""
    from worker.training.artifacts import load_trained_model

    result = full_precision_runs["adalora"]["result"]
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert config["rank_pattern"], "the budget schedule pruned nothing"
    ranks = [tensors[k].shape[0] for k in tensors if k.endswith(".lora_E")]
    assert min(ranks) < config["init_r"]
    assert sum(ranks) == config["target_r"] * len(ranks)  # the final budget: target_r per module on average
    model = load_trained_model(config["base_model_name_or_path"], result.adapter_dir, quantization="none",
                               device="cpu")
    compared = 0
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            prefix = f"base_model.model.{name}"
            a, b, e = (tensors[f"{prefix}.lora_{x}"] for x in "ABE")
            delta = b @ (a * e) * config["lora_alpha"] / (config["init_r"] + 1e-5)
            torch.testing.assert_close(delta, module.get_delta_weight("default"), atol=1e-7, rtol=1e-6)
            compared += 1
    assert compared == 14


RESUME_CASES = {
    "adalora": {"adalora": {"tinit": 1, "tfinal": 2}},
    "prefix_tuning": {"prompt": {"num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16}},
    "bottleneck_adapter": {"bottleneck": {"size": 8}},
}


@pytest.mark.parametrize("method", sorted(RESUME_CASES))
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, method):
    common = dict(n_examples=12, hyper=Hyperparameters(n_epochs=2, batch_size=3), max_seq_length=64,
                  checkpoint_every_steps=3, method=method, quantization="none",
                  learning_rate=LEARNING_RATES.get(method, 3e-3), **RESUME_CASES[method])
    full_ctx = RecordingContext(tmp_path / "store-full")
    full = run_training(make_job(tiny_model_dir, tmp_path / "full", **common), full_ctx)
    assert full.steps == 8 and sorted(full_ctx.checkpoints) == [3, 6]
    checkpoint = full_ctx.checkpoints[3]
    assert all(p.suffix in (".safetensors", ".json", ".md") for p in checkpoint.rglob("*") if p.is_file())

    resumed_ctx = RecordingContext(tmp_path / "store-resumed", resume_from=(3, checkpoint))
    resumed = run_training(make_job(tiny_model_dir, tmp_path / "resumed", **common), resumed_ctx)

    assert resumed_ctx.metric_rows[0]["step"] == 4
    assert resumed.metrics["train_loss"] == pytest.approx(full.metrics["train_loss"], abs=1e-5)
    expected = load_file(full.adapter_dir / "adapter_model.safetensors")
    actual = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    if method == "adalora":
        config = json.loads((full.adapter_dir / "adapter_config.json").read_text())
        assert config["rank_pattern"] == json.loads((resumed.adapter_dir / "adapter_config.json").read_text())[
            "rank_pattern"]
