"""End-to-end recipe runs on the tiny model: learning, events, metrics, checkpoints, resume, stop."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.datasets import Example, Message
from core.schemas.training import Hyperparameters, PeftConfigSpec, resolve_training
from worker.training.interface import TrainingJob, TrainingStopped
from worker.training.recipe import run_training

WORDS = "red green blue cyan magenta yellow black white orange purple".split()


class RecordingContext:
    """A JobContext that keeps everything in memory and stores checkpoints in its own folder."""

    def __init__(self, store: Path, *, resume_from: tuple[int, Path] | None = None,
                 stop_after_checks: int | None = None):
        self.store = store
        self.events: list[tuple[str, str, dict | None]] = []
        self.metric_rows: list[dict] = []
        self.checkpoints: dict[int, Path] = {}
        self.resume_from = resume_from
        self.stop_after_checks = stop_after_checks
        self.stop_checks = 0

    def event(self, message, *, level="info", data=None):
        self.events.append((message, level, data))

    def metrics(self, data):
        self.metric_rows.append(dict(data))

    def should_stop(self):
        self.stop_checks += 1
        return self.stop_after_checks is not None and self.stop_checks > self.stop_after_checks

    def latest_checkpoint(self):
        return self.resume_from

    def save_checkpoint(self, step, folder, metrics):
        copy = self.store / f"step-{step}"
        shutil.copytree(folder, copy)
        self.checkpoints[step] = copy

    def messages(self) -> list[str]:
        return [message for message, _, _ in self.events]


def chat_examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        colour = rng.choice(WORDS)
        question = f"Name a colour like {colour}, {rng.randint(1, 9)} times."
        answer = " ".join([colour] * rng.randint(2, 12))
        examples.append(Example("chat", [Message("user", question), Message("assistant", answer)]))
    return examples


def make_job(tiny_model_dir, work_dir: Path, *, n_examples=16, validation=None, hyper=None, **peft) -> TrainingJob:
    hyper = hyper or Hyperparameters(n_epochs=2, batch_size=4)
    peft.setdefault("learning_rate", 1e-3)
    config = resolve_training(hyper, PeftConfigSpec(**peft), n_examples=n_examples, seed=1234)
    work_dir.mkdir(parents=True, exist_ok=True)
    return TrainingJob(
        job_id="job-test",
        base_model_path=str(tiny_model_dir),
        training_examples=chat_examples(n_examples),
        validation_examples=validation,
        config=config,
        work_dir=work_dir,
    )


def test_short_qlora_run_learns_and_reports(tiny_model_dir, tmp_path):
    job = make_job(
        tiny_model_dir, tmp_path / "work", validation=chat_examples(4, seed=1),
        hyper=Hyperparameters(n_epochs=3, batch_size=4), eval_every_steps=6,
    )
    ctx = RecordingContext(tmp_path / "store")
    result = run_training(job, ctx)

    assert result.steps == 12
    assert result.metrics["train_loss"] < result.metrics["first_train_loss"]
    assert result.metrics["valid_loss"] is not None
    assert result.trained_tokens > 0
    assert 0 < result.trainable_params < result.total_params
    assert result.quantization["linear4bit"] == 14 and result.quantization["all_nested"]
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()

    messages = ctx.messages()
    assert any("cpu" in m and "float32" in m for m in messages)
    quant_events = [data for _, _, data in ctx.events if data and "linear4bit" in data]
    assert quant_events == [result.quantization]
    assert any("truncated" in m for m in messages)
    assert "training finished" in messages[-1]

    steps = [row["step"] for row in ctx.metric_rows]
    assert steps[0] == 1 and steps[-1] == 12
    assert {6, 12} <= set(steps)  # evaluation steps always report
    last = ctx.metric_rows[-1]
    assert set(last) >= {"step", "total_steps", "train_loss", "valid_loss", "learning_rate",
                         "tokens_per_second", "eta_seconds", "epoch"}
    assert last["total_steps"] == 12 and last["epoch"] == pytest.approx(3.0)
    assert last["valid_loss"] == pytest.approx(result.metrics["valid_loss"])
    assert last["tokens_per_second"] > 0


def test_packing_padding_and_checkpointing_give_the_same_loss(tiny_model_dir, tmp_path):
    variants = {
        "packed": dict(packing=True),
        "padded": dict(packing=False),
        "packed, gradient checkpointing": dict(packing=True, gradient_checkpointing=True),
    }
    losses = {}
    for name, peft in variants.items():
        job = make_job(tiny_model_dir, tmp_path / name, dropout=0.0, max_steps=2, **peft)
        result = run_training(job, RecordingContext(tmp_path))
        losses[name] = (result.metrics["first_train_loss"], result.metrics["train_loss"])
    for name, (first, last) in losses.items():
        assert first == pytest.approx(losses["packed"][0], abs=1e-5), name
        assert last == pytest.approx(losses["packed"][1], abs=1e-4), name


@pytest.mark.parametrize("method, quantization", [("dora", "nf4-dq"), ("lora", "none"), ("qlora", "nf4")])
def test_other_methods_train(tiny_model_dir, tmp_path, method, quantization):
    job = make_job(tiny_model_dir, tmp_path / "work", method=method, quantization=quantization, max_steps=2)
    result = run_training(job, RecordingContext(tmp_path / "store"))
    assert result.steps == 2
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert result.quantization["linear4bit"] == (0 if quantization == "none" else 14)


def _adapter_weights(result) -> dict[str, torch.Tensor]:
    return load_file(result.adapter_dir / "adapter_model.safetensors")


def test_resume_from_checkpoint_finishes_like_an_uninterrupted_run(tiny_model_dir, tmp_path):
    common = dict(
        n_examples=12, hyper=Hyperparameters(n_epochs=2, batch_size=3), validation=chat_examples(3, seed=2),
        eval_every_steps=4, checkpoint_every_steps=3, lr_scheduler="cosine", warmup_ratio=0.2,
        weight_decay=0.01,
    )
    full_ctx = RecordingContext(tmp_path / "store-full")
    full = run_training(make_job(tiny_model_dir, tmp_path / "full", **common), full_ctx)
    assert full.steps == 8
    assert sorted(full_ctx.checkpoints) == [3, 6]
    checkpoint = full_ctx.checkpoints[3]
    files = sorted(p.name for p in checkpoint.rglob("*") if p.is_file())
    assert all(name.endswith((".safetensors", ".json", ".md")) for name in files), files
    assert not (tmp_path / "full" / "checkpoints" / "step-000003").exists()  # local copy removed

    resumed_ctx = RecordingContext(tmp_path / "store-resumed", resume_from=(3, checkpoint))
    resumed = run_training(make_job(tiny_model_dir, tmp_path / "resumed", **common), resumed_ctx)

    resume_events = [(m, d) for m, _, d in resumed_ctx.events if "resumed from checkpoint" in m]
    assert resume_events == [("resumed from checkpoint at step 3", {"resumed_from_step": 3})]
    assert resumed.steps == full.steps
    assert resumed_ctx.metric_rows[0]["step"] == 4
    assert resumed.trained_tokens == full.trained_tokens
    assert resumed.metrics["first_train_loss"] == pytest.approx(full.metrics["first_train_loss"])
    assert resumed.metrics["train_loss"] == pytest.approx(full.metrics["train_loss"], abs=1e-5)
    assert resumed.metrics["valid_loss"] == pytest.approx(full.metrics["valid_loss"], abs=1e-5)
    full_lrs = {row["step"]: row["learning_rate"] for row in full_ctx.metric_rows}
    for row in resumed_ctx.metric_rows:
        if row["step"] in full_lrs:
            assert row["learning_rate"] == pytest.approx(full_lrs[row["step"]])
    expected, actual = _adapter_weights(full), _adapter_weights(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_should_stop_raises_training_stopped(tiny_model_dir, tmp_path):
    job = make_job(tiny_model_dir, tmp_path / "work")
    ctx = RecordingContext(tmp_path / "store", stop_after_checks=3)
    with pytest.raises(TrainingStopped):
        run_training(job, ctx)
    assert not (job.work_dir / "adapter").exists()
