"""A job that continues a fine-tuned model starts from its saved weights (`AttachedMethod.load_adapter_weights`),
exactly: the attached model then gives the logits of the artifact loaded by plain peft (or our bottleneck loader);
an artifact of another shape is refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import PeftModel

from core.schemas.training import Hyperparameters, StartAdapter
from tests.support.adapters import save_peft_lora
from tests.support.tiny_training import load_tiny, logits, token_batches
from tests.worker.training.test_training_recipe import RecordingContext, make_job
from worker.device import DeviceChoice
from worker.training.methods.bottleneck_module import load_bottleneck_adapters
from worker.training.model import evaluation_mode, load_model_for_training
from worker.training.recipe import run_training

CASES = {
    "lora": {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "qlora": {"r": 4, "quantization": "nf4-dq"},
    "dora": {"r": 4},
    "ia3": {},
    "prompt_tuning": {"prompt": {"num_virtual_tokens": 4}},
    "bottleneck_adapter": {"bottleneck": {"size": 8, "placement": ["mlp"]}},
}
LEARNING_RATES = {"ia3": 3e-2, "prompt_tuning": 3e-2, "bottleneck_adapter": 3e-3}


def _job(tiny_model_dir, work, method: str, **options):
    return make_job(tiny_model_dir, work, n_examples=4, hyper=Hyperparameters(n_epochs=3, batch_size=4),
                    method=method, max_steps=3, learning_rate=LEARNING_RATES.get(method, 1e-2),
                    **{"quantization": "none", **CASES[method], **options})


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """Each method trained for a few steps: its job and its saved artifact folder."""
    work = tmp_path_factory.mktemp("start-adapter")
    runs = {}
    for method in CASES:
        job = _job(tiny_model_dir, work / method, method)
        result = run_training(job, RecordingContext(work / f"{method}-store"))
        folder = shutil.copytree(result.adapter_dir, work / f"{method}-artifact")
        runs[method] = (job, folder, result)
    return runs


def _attached(tiny_model_dir, config):
    loaded = load_model_for_training(str(tiny_model_dir), config, DeviceChoice(torch.device("cpu"), torch.float32))
    return loaded.method


def _reference(tiny_model_dir, config, folder) -> torch.nn.Module:
    method, base = config.peft.method, load_tiny(tiny_model_dir, quantization=config.quantization)
    if method == "bottleneck_adapter":
        load_bottleneck_adapters(base, folder)
        return base
    return PeftModel.from_pretrained(base, str(folder))


def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with evaluation_mode(model):  # as the recipe evaluates (4-bit linears keep their training-mode kernel)
        return logits(model, batch)


@pytest.mark.parametrize("method", list(CASES))
def test_a_loaded_artifact_gives_exactly_the_logits_plain_loading_gives(tiny_model_dir, trained, method):
    job, folder, _ = trained[method]
    batch = token_batches(1, length=10)[0]
    expected = _logits(_reference(tiny_model_dir, job.config, folder), batch)

    fresh = _attached(tiny_model_dir, job.config)
    untrained = _logits(fresh.model, batch)
    fresh.load_adapter_weights(folder)
    loaded = _logits(fresh.model, batch)

    assert torch.equal(loaded, expected)
    assert (untrained - expected).abs().max() > 1e-4  # the comparison would notice weights that did not load


@pytest.mark.parametrize("method, other", [
    ("lora", {"r": 8}),
    ("lora", {"target_modules": ["q_proj", "v_proj"]}),
    ("lora", {"method": "dora"}),
    ("prompt_tuning", {"prompt": {"num_virtual_tokens": 6}}),
    ("bottleneck_adapter", {"bottleneck": {"size": 16, "placement": ["mlp"]}}),
])
def test_an_artifact_of_another_shape_is_refused(tiny_model_dir, trained, tmp_path, method, other):
    _, folder, _ = trained[method]
    kind = other.pop("method", method)
    mismatched = _attached(tiny_model_dir, _job(tiny_model_dir, tmp_path, kind, **other).config)
    with pytest.raises(ValueError, match="shape|does not fit|saved adapter is"):
        mismatched.load_adapter_weights(folder)


def test_an_artifact_that_leaves_trainable_parameters_untouched_is_refused(tiny_model_dir, trained, tmp_path):
    _, folder, _ = trained["lora"]
    with_bitfit = _attached(tiny_model_dir, _job(tiny_model_dir, tmp_path, "lora", sparse={"kind": "bitfit"}).config)
    with pytest.raises(ValueError, match="start untrained"):
        with_bitfit.load_adapter_weights(folder)


def test_the_recipe_continues_from_the_start_adapter_and_says_so(tiny_model_dir, trained, tmp_path):
    parent_job, folder, parent = trained["lora"]
    start = StartAdapter(id="adapter-parent", fine_tuned_model="ft:tiny:acme:bot:parent", name="bot", version=1,
                         storage_key="adapters/adapter-parent", sha256="0" * 64, method="lora")
    job = _job(tiny_model_dir, tmp_path / "work", "lora")
    job.config = job.config.model_copy(update={"start_adapter": start})
    job.start_adapter_dir = folder
    ctx = RecordingContext(tmp_path / "store")
    child = run_training(job, ctx)

    assert [data for _, _, data in ctx.events if data and "start_adapter" in data] == [{"start_adapter": start.id}]
    # The same first batch as the parent's: the child's first loss is where the parent ended, not where it began.
    assert child.metrics["first_train_loss"] < parent.metrics["first_train_loss"] - 0.01
    assert abs(child.metrics["first_train_loss"] - parent.metrics["train_loss"]) < abs(
        parent.metrics["first_train_loss"] - parent.metrics["train_loss"])


def test_an_imported_peft_lora_loads_as_plain_peft_loads_it(tiny_model_dir, tmp_path):
    folder = save_peft_lora(tiny_model_dir, tmp_path / "imported", r=4, targets=("k_proj", "q_proj"))
    config = _job(tiny_model_dir, tmp_path / "job", "lora", target_modules=["k_proj", "q_proj"]).config
    batch = token_batches(1, length=10)[0]
    expected = _logits(_reference(tiny_model_dir, config, folder), batch)
    attached = _attached(tiny_model_dir, config)
    attached.load_adapter_weights(folder)
    assert torch.equal(_logits(attached.model, batch), expected)
