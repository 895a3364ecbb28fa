"""Layer drop on a small random Llama: which layers run, determinism, eval, checkpointing, uninstall."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from worker.training.techniques.layer_drop import LayerDrop, fill_missing_grads

N_LAYERS = 6
IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


@pytest.fixture
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return LlamaForCausalLM(config).train()


def _record_runs(model) -> list[int]:
    """Layer indices whose attention ran, in call order."""
    ran: list[int] = []
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(lambda *_, index=index: ran.append(index))
    return ran


def test_sampled_layers_are_skipped_and_pass_their_input_through(model):
    ran = _record_runs(model)
    drop = LayerDrop(model, p=0.5, seed=7)
    passthrough = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda _, args, out: passthrough.append(out is args[0]))
    seen_sizes = set()
    for step in range(8):
        drop.begin_step(step)
        ran.clear(), passthrough.clear()
        model(input_ids=IDS)
        model(input_ids=IDS)  # a second micro-batch of the same step skips the same layers
        expected = [i for i in range(N_LAYERS) if i not in drop.dropped] * 2
        assert ran == expected
        assert passthrough == [i in drop.dropped for i in range(N_LAYERS)] * 2
        seen_sizes.add(len(drop.dropped))
    assert len(seen_sizes) > 1 and max(seen_sizes) > 0


def test_the_skipped_set_depends_only_on_seed_and_step(model):
    drop = LayerDrop(model, p=0.5, seed=7)
    sets = [drop.dropped_layers(step) for step in range(20)]
    drop.uninstall()
    again = LayerDrop(model, p=0.5, seed=7)
    assert [again.dropped_layers(step) for step in range(20)] == sets
    again.begin_step(5)
    assert again.dropped == sets[5]
    assert len(set(sets)) > 5
    again.seed = 8
    assert [again.dropped_layers(step) for step in range(20)] != sets


def test_at_least_one_layer_always_runs(model):
    drop = LayerDrop(model, p=0.95, seed=0)
    sizes = [len(drop.dropped_layers(step)) for step in range(200)]
    assert max(sizes) == N_LAYERS - 1


def test_nothing_is_dropped_in_eval_mode(model):
    with torch.no_grad():
        full = model.eval()(input_ids=IDS).logits
    ran = _record_runs(model)
    drop = LayerDrop(model, p=0.9, seed=0)
    drop.begin_step(3)
    assert drop.dropped
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, full)
    assert ran == list(range(N_LAYERS))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=IDS).logits, full)


def test_dropped_layers_get_no_gradient_under_gradient_checkpointing(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ran = _record_runs(model)
    drop = LayerDrop(model, p=0.5, seed=1)
    drop.begin_step(2)
    assert 0 < len(drop.dropped) < N_LAYERS
    model(input_ids=IDS, labels=IDS).loss.backward()
    kept = [i for i in range(N_LAYERS) if i not in drop.dropped]
    assert ran == kept + kept[::-1]  # forward, then the backward recomputation of each kept layer
    for index, layer in enumerate(model.model.layers):
        grads = [p.grad for p in layer.parameters()]
        if index in drop.dropped:
            assert all(g is None for g in grads)
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_install_keeps_names_and_uninstall_restores_the_forward(model):
    keys = list(model.state_dict())
    with torch.no_grad():
        full = model(input_ids=IDS).logits
    drop = LayerDrop(model, p=0.5, seed=3)
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="already has its forward replaced"):
        LayerDrop(model, p=0.5, seed=3)
    drop.uninstall()
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, full)


def test_works_on_a_peft_model_without_changing_adapter_names(model):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    names = list(get_peft_model_state_dict(peft_model))
    ran = _record_runs(model)
    drop = LayerDrop(peft_model, p=0.5, seed=7)
    drop.begin_step(1)
    peft_model(input_ids=IDS)
    assert ran == [i for i in range(N_LAYERS) if i not in drop.dropped] and drop.dropped
    assert list(get_peft_model_state_dict(peft_model)) == names


def test_adalora_budget_updates_run_after_a_step_with_skipped_layers(model):
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(init_r=4, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=4,
                           target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    drop = LayerDrop(peft_model, p=0.5, seed=7)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    drop.begin_step(1)
    assert drop.dropped
    peft_model(input_ids=IDS, labels=IDS).loss.backward()
    skipped = [p for p in params if p.grad is None]
    assert skipped
    before = [p.detach().clone() for p in skipped]
    optimizer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, skipped))  # a skipped layer does not move
    with pytest.raises(TypeError):
        peft_model.base_model.update_and_allocate(1)
    fill_missing_grads(params)
    peft_model.base_model.update_and_allocate(1)
