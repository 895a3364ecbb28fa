"""`gradient_checkpointing: "auto"`: activations measured per token, checkpointing on only where they crowd memory."""

from __future__ import annotations

import pytest
import torch

from core.schemas.training import Hyperparameters, PeftConfigSpec, resolve_training
from tests.worker.training.test_training_recipe import RecordingContext, make_job
from worker.device import choose_device
from worker.training import activation_memory
from worker.training.activation_memory import activation_bytes_per_token, choose_checkpointing
from worker.training.model import load_model_for_training
from worker.training.recipe import run_training


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    config = resolve_training(Hyperparameters(), PeftConfigSpec(), n_examples=100, seed=0)
    torch.manual_seed(0)
    model = load_model_for_training(str(tiny_model_dir), config, choose_device()).model
    model.train()
    return model


def _parts(model):
    causal_lm = model.get_base_model()
    return causal_lm.get_decoder(), causal_lm.get_output_embeddings().weight.shape[0]


def _kept_bytes_of_a_forward(model, tokens: int) -> int:
    decoder, vocab = _parts(model)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def record(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        decoder(input_ids=ids, use_cache=False)
    return sum(seen.values())


def test_the_probe_measures_what_a_longer_forward_keeps_and_leaves_the_rng_alone(loaded):
    decoder, vocab = _parts(loaded)
    state = torch.get_rng_state()
    loaded.eval()  # as the recipe's setup finds it; the probe must still run in training mode
    per_token = activation_bytes_per_token(loaded, decoder, torch.device("cpu"), vocab)
    assert torch.equal(torch.get_rng_state(), state)
    assert not any(module.training for module in loaded.modules())
    loaded.train()
    hidden = loaded.get_base_model().config.hidden_size
    assert per_token > 2 * hidden * 4 * 2  # at least a couple of fp32 hidden vectors per layer (2 layers)
    assert _kept_bytes_of_a_forward(loaded, 256) / 256 == pytest.approx(per_token, rel=0.15)


def test_checkpointing_turns_on_only_when_the_estimate_exceeds_half_the_available_memory(loaded):
    decoder, vocab = _parts(loaded)
    common = dict(row_tokens=2048, vocab_size=vocab, chunk_tokens=1024)
    roomy = choose_checkpointing(loaded, decoder, torch.device("cpu"), available_bytes=1 << 40, **common)
    assert not roomy.enabled and roomy.estimate_bytes > roomy.bytes_per_token * 2048
    tight = choose_checkpointing(loaded, decoder, torch.device("cpu"), available_bytes=roomy.estimate_bytes, **common)
    assert tight.enabled
    assert "on (auto)" in tight.message() and "2048 tokens" in tight.message()
    assert tight.data()["gradient_checkpointing"] is True
    assert activation_memory.available_memory_bytes(torch.device("cpu")) > 0


def _auto_events(ctx):
    return [(m, d) for m, _, d in ctx.events if "(auto)" in m]


def test_a_job_on_auto_reports_the_choice_and_trains_either_way(tiny_model_dir, tmp_path, monkeypatch):
    roomy_ctx = RecordingContext(tmp_path / "roomy")
    roomy = run_training(make_job(tiny_model_dir, tmp_path / "a", dropout=0.0, max_steps=2), roomy_ctx)
    [(message, data)] = _auto_events(roomy_ctx)
    assert "off (auto)" in message and data["gradient_checkpointing"] is False

    monkeypatch.setattr(activation_memory, "available_memory_bytes", lambda device: 1 << 20)  # a 1 MB machine
    tight_ctx = RecordingContext(tmp_path / "tight")
    tight = run_training(make_job(tiny_model_dir, tmp_path / "b", dropout=0.0, max_steps=2), tight_ctx)
    [(message, data)] = _auto_events(tight_ctx)
    assert "on (auto)" in message and data["gradient_checkpointing"] is True
    assert tight.metrics["train_loss"] == pytest.approx(roomy.metrics["train_loss"], abs=1e-4)


def test_an_explicit_choice_is_not_probed(tiny_model_dir, tmp_path):
    ctx = RecordingContext(tmp_path / "store")
    run_training(make_job(tiny_model_dir, tmp_path / "work", gradient_checkpointing=False, max_steps=1), ctx)
    assert not _auto_events(ctx)
