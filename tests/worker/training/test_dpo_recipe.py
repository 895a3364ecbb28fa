"""DPO on the tiny model: the loss, the reference, pair rows, learning, and exact resume."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.datasets import Example, Message
from core.schemas.training import DpoHyperparameters, PeftConfigSpec, resolve_training
from tests.worker.training.test_training_recipe import WORDS, RecordingContext
from worker.training.dpo_recipe import REFERENCE_FILE, DpoRecipe, dpo_statistics
from worker.training.interface import TrainingJob
from worker.training.pairs import pair_rows, tokenize_pair
from worker.training.recipe import run_training


def preference_examples(n: int, seed: int = 0) -> list[Example]:
    """Prefer repeating the asked colour over naming another one."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        colour, other = rng.sample(WORDS, 2)
        examples.append(Example(
            "preference", [Message("system", "Answer with colours."), Message("user", f"Repeat {colour}.")],
            chosen=" ".join([colour] * rng.randint(2, 5)), rejected=" ".join([other] * rng.randint(1, 4))))
    return examples


def dpo_job(tiny_model_dir, work_dir: Path, *, n=16, validation=None, hyper=None, **peft) -> TrainingJob:
    peft.setdefault("learning_rate", 2e-3)
    hyper = hyper or DpoHyperparameters(n_epochs=2, batch_size=4, beta=0.1)
    config = resolve_training(hyper, PeftConfigSpec(**peft), n_examples=n, seed=7, method="dpo")
    work_dir.mkdir(parents=True, exist_ok=True)
    return TrainingJob(job_id="job-dpo", base_model_path=str(tiny_model_dir),
                       training_examples=preference_examples(n), validation_examples=validation,
                       config=config, work_dir=work_dir)


def test_dpo_statistics_follow_the_formula():
    policy = torch.tensor([[-1.0, -3.0], [-2.0, -1.0]])
    reference = torch.tensor([[-2.0, -2.0], [-2.0, -2.0]])
    stats = dpo_statistics(policy, reference, beta=0.5)
    torch.testing.assert_close(stats["chosen"], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(stats["rejected"], torch.tensor([-0.5, 0.5]))
    torch.testing.assert_close(stats["margin"], torch.tensor([1.0, -0.5]))
    torch.testing.assert_close(stats["loss"], -F.logsigmoid(torch.tensor([1.0, -0.5])))


def test_a_long_pair_loses_prompt_tokens_from_the_left_and_keeps_its_answers(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = Example("preference", [Message("user", "colour " * 60)], chosen="red red red", rejected="blue")
    full = tokenize_pair(example, tokenizer, max_seq_length=4096)
    cut = tokenize_pair(example, tokenizer, max_seq_length=40)
    assert not full.truncated and cut.truncated
    assert max(cut.chosen.n_tokens, cut.rejected.n_tokens) == 40
    for before, after in ((full.chosen, cut.chosen), (full.rejected, cut.rejected)):
        assert after.input_ids == before.input_ids[-after.n_tokens:]  # only the left went
        assert after.n_labelled == before.n_labelled
    dropped = full.chosen.n_tokens - cut.chosen.n_tokens
    assert dropped == full.rejected.n_tokens - cut.rejected.n_tokens  # the same prompt cut on both


def _base_logps(model_dir: Path, pair) -> list[float]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums = []
    for sequence in (pair.chosen, pair.rejected):
        ids = torch.tensor([sequence.input_ids])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = torch.tensor(sequence.next_token_targets()[:-1])
        labelled = targets != -100
        sums.append(logps[labelled].gather(1, targets[labelled, None]).sum().item())
    return sums


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "ia3", "bottleneck_adapter"])
def test_the_reference_is_the_base_with_the_adapter_off(tiny_model_dir, tmp_path, method):
    job = dpo_job(tiny_model_dir, tmp_path / "work", n=4, method=method)
    recipe = DpoRecipe(job, RecordingContext(tmp_path / "store"))
    try:
        recipe.setup()
        for i in (0, 3):
            expected = _base_logps(tiny_model_dir, recipe.train_data.examples[i])
            assert recipe.reference["train"][i].tolist() == pytest.approx(expected, abs=1e-3)
    finally:
        recipe.cleanup()


def test_packed_and_padded_pairs_give_the_same_log_probabilities(tiny_model_dir, tmp_path):
    job = dpo_job(tiny_model_dir, tmp_path / "work", n=8, dropout=0.0)
    recipe = DpoRecipe(job, RecordingContext(tmp_path / "store"))
    try:
        recipe.setup()
        pairs, ids = recipe.train_data.examples, list(range(8))
        with torch.no_grad():
            by_layout = {}
            for packing in (True, False):
                rows = pair_rows(pairs, ids, packing=packing, row_token_cap=10_000, pad_id=0)
                assert len(rows) == 1
                by_layout[packing], _ = recipe._sequence_logps(rows[0])
        order = rows[0].pair_ids  # padded rows sort their pairs by length
        torch.testing.assert_close(by_layout[False], by_layout[True][order], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(by_layout[True], recipe.reference["train"], atol=1e-4, rtol=1e-4)
    finally:
        recipe.cleanup()


def test_dpo_learns_the_preference_and_reports_rewards(tiny_model_dir, tmp_path):
    job = dpo_job(tiny_model_dir, tmp_path / "work", n=16, validation=preference_examples(4, seed=5),
                  hyper=DpoHyperparameters(n_epochs=4, batch_size=4, beta=0.1), eval_every_steps=8)
    ctx = RecordingContext(tmp_path / "store")
    result = run_training(job, ctx)
    assert result.steps == 16
    first, last = ctx.metric_rows[0], ctx.metric_rows[-1]
    for row in (first, last):
        assert set(row) >= {"dpo_loss", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"}
    assert last["reward_margin"] > first["reward_margin"]
    assert last["reward_accuracy"] > first["reward_accuracy"] or last["reward_accuracy"] == 1.0
    assert last["train_loss"] < first["train_loss"]
    assert first["reward_margin"] == 0 and first["reward_accuracy"] == 0  # the first step's policy is the reference
    assert {"valid_loss", "valid_reward_margin", "valid_reward_accuracy"} <= set(last)
    assert any("padded micro-batches" in m or "packed" in m for m in ctx.messages())
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_resume_keeps_the_reference_and_finishes_like_an_uninterrupted_run(tiny_model_dir, tmp_path):
    common = dict(n=12, hyper=DpoHyperparameters(n_epochs=2, batch_size=3, beta=0.2), checkpoint_every_steps=3,
                  validation=preference_examples(3, seed=9), eval_every_steps=4)
    full_ctx = RecordingContext(tmp_path / "store-full")
    full = run_training(dpo_job(tiny_model_dir, tmp_path / "full", **common), full_ctx)
    checkpoint = full_ctx.checkpoints[3]
    assert (checkpoint / REFERENCE_FILE).is_file()
    resumed_ctx = RecordingContext(tmp_path / "store-resumed", resume_from=(3, checkpoint))
    resumed = run_training(dpo_job(tiny_model_dir, tmp_path / "resumed", **common), resumed_ctx)
    assert not any("reference log-probabilities computed" in m for m in resumed_ctx.messages())
    assert resumed.metrics["train_loss"] == pytest.approx(full.metrics["train_loss"], abs=1e-5)
    assert resumed.metrics["valid_loss"] == pytest.approx(full.metrics["valid_loss"], abs=1e-5)
    expected = load_file(full.adapter_dir / "adapter_model.safetensors")
    actual = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
