"""Layer-wise learning-rate decay: group learning rates, the scheduler, and checkpointed param groups."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import get_scheduler

from tests.support.tiny_training import load_tiny, token_batches, train_steps
from worker.training.checkpoint import _optimizer_from_files, _optimizer_to_files
from worker.training.techniques.layerwise_lr import group_param_names, layer_indices, optimizer_param_groups

LR, DECAY = 1e-3, 0.5


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _lr_by_name(groups) -> dict[str, float]:
    return {name: group["lr"] for group in groups for name in group["param_names"]}


def test_lr_of_layer_l_is_lr_times_decay_to_the_layers_above(tiny_model_dir):
    model = load_tiny(tiny_model_dir).requires_grad_(True)  # 2 layers, tied embeddings
    groups = optimizer_param_groups(_trainable(model), model, lr=LR, weight_decay=0.0, decay=DECAY)
    assert [group["layer"] for group in groups] == [-1, 0, 1, None]
    lrs = _lr_by_name(groups)
    assert lrs["model.embed_tokens.weight"] == pytest.approx(LR * DECAY**2)  # before the first layer
    assert lrs["model.layers.0.mlp.down_proj.weight"] == pytest.approx(LR * DECAY)
    assert lrs["model.layers.1.input_layernorm.weight"] == pytest.approx(LR)
    assert lrs["model.norm.weight"] == LR  # after the last layer
    assert group_param_names(groups) == [n for g in groups for n in g["param_names"]]
    assert sorted(group_param_names(groups)) == sorted(n for n, _ in _trainable(model))


def test_lora_parameters_follow_their_layer_and_virtual_tokens_come_first(tiny_model_dir):
    lora = get_peft_model(load_tiny(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    layers = layer_indices(_trainable(lora), lora)
    assert layers == {name: int(name.split("layers.")[1][0]) for name in layers} and len(layers) == 4
    prompt = get_peft_model(load_tiny(tiny_model_dir), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    groups = optimizer_param_groups(_trainable(prompt), prompt, lr=LR, weight_decay=0.0, decay=DECAY)
    assert [(g["layer"], g["param_names"]) for g in groups] == [(-1, ["prompt_encoder.default.embedding.weight"])]
    assert groups[0]["lr"] == pytest.approx(LR * DECAY**2)


def test_zero_weight_decay_parameters_get_their_own_groups(tiny_model_dir):
    model = load_tiny(tiny_model_dir)
    down = model.get_submodule("model.layers.0.mlp.down_proj").weight
    up = model.get_submodule("model.layers.0.mlp.up_proj").weight
    named = [("model.layers.0.mlp.down_proj.weight", down), ("model.layers.0.mlp.up_proj.weight", up)]
    groups = optimizer_param_groups(named, model, lr=LR, weight_decay=0.1, decay=DECAY, without_weight_decay=[up])
    assert [(g["param_names"], g["weight_decay"], g["lr"]) for g in groups] == [
        (["model.layers.0.mlp.down_proj.weight"], 0.1, LR * DECAY),
        (["model.layers.0.mlp.up_proj.weight"], 0.0, LR * DECAY)]
    plain = optimizer_param_groups(named, model, lr=LR, weight_decay=0.1)
    assert [(g["lr"], g["weight_decay"], g["layer"]) for g in plain] == [(LR, 0.1, None)]


def test_ratios_survive_the_scheduler_and_a_checkpoint_round_trip(tiny_model_dir):
    def build():
        lora = LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0)
        model = get_peft_model(load_tiny(tiny_model_dir), lora)
        groups = optimizer_param_groups(_trainable(model), model, lr=LR, weight_decay=0.01, decay=DECAY)
        optimizer = torch.optim.AdamW(groups, lr=LR)
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
        return model, groups, optimizer, scheduler

    model, groups, optimizer, scheduler = build()
    train_steps(model, optimizer, token_batches(3, length=6), after_step=scheduler.step)
    factor = scheduler.lr_lambdas[0](3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
        [LR * DECAY ** (1 - g["layer"]) * factor for g in optimizer.param_groups])
    assert [g["initial_lr"] for g in optimizer.param_groups] == pytest.approx([LR * DECAY, LR])

    names = group_param_names(groups)
    tensors, saved_groups = _optimizer_to_files(optimizer, names)
    assert [g["param_names"] for g in saved_groups] == [g["param_names"] for g in groups]
    _, _, restored, _ = build()
    _optimizer_from_files(restored, names, tensors, saved_groups)
    assert [g["lr"] for g in restored.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert [g["param_names"] for g in restored.param_groups] == [g["param_names"] for g in groups]
    for before, after in zip(optimizer.state.values(), restored.state.values(), strict=True):
        assert torch.equal(before["exp_avg"], after["exp_avg"])
