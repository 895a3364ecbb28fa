"""Sparse fine-tuning on the tiny model: BitFit, named modules (also on 4-bit) and top-k, with real
training, the artifact it writes, and exact resume."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from core.schemas.peft_methods import SparseSpec
from tests.support.tiny_training import load_tiny, logits, token_batches, train_steps
from worker.formats.sparse_deltas import SPARSE_DELTAS_FILE, read_sparse_deltas
from worker.model_parts import decoder_linears
from worker.training.techniques.layerwise_lr import optimizer_param_groups
from worker.training.techniques.sparse import SparseTraining, quantization_skip_modules
from worker.training.techniques.sparse_apply import apply_sparse_deltas
from worker.training.techniques.sparse_selection import names_module

IDS = torch.tensor([[5, 17, 300, 42, 9, 77, 123, 8]])


def _adamw(model, sparse, *, weight_decay=0.1, lr=1e-2):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = optimizer_param_groups(named, model, lr=lr, weight_decay=weight_decay,
                                    without_weight_decay=sparse.params_without_weight_decay())
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def test_module_entries_name_modules_layers_and_suffixes():
    name = "model.layers.1.mlp.down_proj"
    for entry in (name, "mlp.down_proj", "down_proj", "layers.1", "layers.1.mlp", "mlp"):
        assert names_module(name, entry)
    for entry in ("layers.11", "proj", "layers.1.self_attn", "mlp.up_proj"):
        assert not names_module(name, entry)
    assert not names_module("model.layers.11.mlp.down_proj", "layers.1")


def test_bitfit_trains_only_biases_beside_lora_and_reloads(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    model = load_tiny(tiny_model_dir)
    sparse = SparseTraining(model, SparseSpec(kind="bitfit"))
    linears = decoder_linears(model)
    assert len(linears) == 14 and all(torch.equal(lin.bias, torch.zeros_like(lin.bias)) for lin in linears.values())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    sparse.make_trainable()
    wrapped = decoder_linears(peft_model)  # the base linears under LoRA, by their base names
    assert list(wrapped) == list(linears) and all(wrapped[n] is linears[n] for n in linears)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {
        f"base_model.model.{name}.{'base_layer.' if name.endswith(('q_proj', 'v_proj')) else ''}bias"
        for name in linears}
    assert len(sparse.added_parameters()) == 14
    n_biases = sum(lin.out_features for lin in linears.values())
    assert sparse.trainable_entries == n_biases == 2 * (64 * 3 + 32 * 2 + 128 * 2)
    weights = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}

    losses = train_steps(peft_model, _adamw(peft_model, sparse), token_batches(1) * 3)
    assert losses[-1] < losses[0]
    assert all(torch.equal(weights[n], p) for n, p in peft_model.named_parameters() if not p.requires_grad)
    assert all(lin.bias.abs().sum() > 0 for lin in linears.values())

    sparse.save(tmp_path)
    peft_model.save_pretrained(tmp_path, safe_serialization=True)
    fresh = load_tiny(tiny_model_dir)
    apply_sparse_deltas(fresh, tmp_path)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(logits(reloaded, IDS), logits(peft_model, IDS), rtol=0, atol=1e-5)


def test_bitfit_on_a_4bit_base_trains_added_biases_through_linear4bit(tiny_model_dir, tmp_path):
    model = load_tiny(tiny_model_dir, quantization="nf4-dq")
    sparse = SparseTraining(model, SparseSpec(kind="bitfit"))
    sparse.make_trainable()
    linears = decoder_linears(model)
    assert all(type(lin).__name__ == "Linear4bit" for lin in linears.values())
    losses = train_steps(model, _adamw(model, sparse), token_batches(1) * 3)
    assert losses[-1] < losses[0]
    assert all(lin.bias.abs().sum() > 0 for lin in linears.values())  # gradients reached every bias

    sparse.save(tmp_path)
    assert all(delta.bias_added and delta.weight is None for delta in read_sparse_deltas(tmp_path).values())
    fresh = load_tiny(tiny_model_dir, quantization="nf4-dq")
    apply_sparse_deltas(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, IDS), logits(model, IDS), rtol=0, atol=1e-5)


def test_modules_on_a_4bit_base_keep_the_chosen_linears_in_full_precision(tiny_model_dir, tmp_path):
    spec = SparseSpec(kind="modules", modules=["layers.1.mlp", "layers.0.self_attn.o_proj"])
    skip = quantization_skip_modules(spec, tiny_model_dir)
    mlp = [f"model.layers.1.mlp.{name}" for name in ("down_proj", "gate_proj", "up_proj")]
    chosen = ["model.layers.0.self_attn.o_proj", *mlp]
    assert skip == sorted(["lm_head", "model.embed_tokens", "model.norm", *chosen])
    assert quantization_skip_modules(SparseSpec(kind="bitfit"), tiny_model_dir) is None
    with pytest.raises(ValueError, match="quantized to 4-bit"):
        SparseTraining(load_tiny(tiny_model_dir, quantization="nf4-dq"), spec)

    model = load_tiny(tiny_model_dir, quantization="nf4-dq", skip_modules=skip)
    kinds = {name: type(lin).__name__ for name, lin in decoder_linears(model).items()}
    assert [name for name, kind in kinds.items() if kind == "Linear"] == sorted(chosen, key=list(kinds).index)
    assert list(kinds.values()).count("Linear4bit") == 10
    sparse = SparseTraining(model, spec)
    sparse.make_trainable()
    assert sparse.trainable_entries == 64 * 64 + 3 * 64 * 128
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, _adamw(model, sparse), token_batches(3))
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {f"{name}.weight" for name in chosen}

    config = sparse.save(tmp_path)
    assert {entry["storage"] for entry in config["parameters"].values()} == {"dense"}
    fresh = load_tiny(tiny_model_dir, quantization="nf4-dq", skip_modules=skip)
    apply_sparse_deltas(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, IDS), logits(model, IDS), rtol=0, atol=1e-5)


def test_weights_that_train_on_a_bfloat16_base_are_kept_in_float32(tiny_model_dir):
    model = load_tiny(tiny_model_dir, dtype=torch.bfloat16)
    sparse = SparseTraining(model, SparseSpec(kind="modules", modules=["layers.0.mlp.down_proj"]))
    sparse.make_trainable()
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    assert down.weight.dtype == torch.float32
    assert model.get_submodule("model.layers.0.mlp.up_proj").weight.dtype == torch.bfloat16
    before = down.weight.detach().clone()
    outputs = []
    down.register_forward_hook(lambda _, args, out: outputs.append((args[0].dtype, out.dtype)))
    model(input_ids=IDS)
    assert outputs == [(torch.bfloat16, torch.bfloat16)]
    train_steps(model, _adamw(model, sparse, lr=1e-5), token_batches(1))
    assert (down.weight != before).float().mean() > 0.9  # bfloat16 would have rounded most updates away


def test_unknown_module_entries_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="'layers.7' names no decoder linear"):
        SparseTraining(load_tiny(tiny_model_dir), SparseSpec(kind="modules", modules=["layers.7"]))


def _top_k(tiny_model_dir, density=0.01, warmup_steps=2):
    model = load_tiny(tiny_model_dir)
    sparse = SparseTraining(model, SparseSpec(kind="top_k", density=density, warmup_steps=warmup_steps))
    sparse.make_trainable()
    return model, sparse


def test_top_k_warms_up_then_trains_exactly_the_chosen_entries(tiny_model_dir, tmp_path):
    model, sparse = _top_k(tiny_model_dir)
    originals = {n: p.detach().clone() for n, p in sparse.named_parameters().items()}
    candidates = sum(p.numel() for p in originals.values())
    assert sparse.candidate_entries == candidates and sparse.trainable_entries == round(0.01 * candidates)
    optimizer = _adamw(model, sparse)
    batches = token_batches(5)
    train_steps(model, optimizer, batches[:2], after_step=lambda: sparse.after_optimizer_step(optimizer))
    assert sparse.warmup_done and not any(p in optimizer.state for p in sparse.parameters())  # Adam restarts
    assert all(p.requires_grad for p in sparse.parameters())  # entries are masked, parameters stay the same
    assert all(torch.equal(originals[n], p) for n, p in sparse.named_parameters().items())  # warm-up moved nothing

    train_steps(model, optimizer, batches[2:], after_step=lambda: sparse.after_optimizer_step(optimizer))
    masks = {n: torch.zeros(p.numel(), dtype=torch.bool) for n, p in originals.items()}
    deltas = sparse.deltas()
    for name, delta in deltas.items():
        masks[name][delta.delta.indices] = True
    assert sum(int(mask.sum()) for mask in masks.values()) == sparse.trainable_entries
    n_changed = 0
    for name, param in sparse.named_parameters().items():
        trained, original, mask = param.detach().view(-1), originals[name].view(-1), masks[name]
        assert torch.equal(trained[~mask], original[~mask])  # bit-identical outside the mask
        n_changed += int((trained[mask] != original[mask]).sum())
    assert n_changed > 0.9 * sparse.trainable_entries

    config = sparse.save(tmp_path)
    stored = load_file(tmp_path / SPARSE_DELTAS_FILE)
    for name, entry in config["parameters"].items():
        assert entry["storage"] == "indices"
        assert torch.equal(stored[f"{name}.indices"], masks[name].nonzero().view(-1))
    assert config["trainable_entries"] == sparse.trainable_entries
    fresh = load_tiny(tiny_model_dir)
    apply_sparse_deltas(fresh, tmp_path)
    for name, param in sparse.named_parameters().items():
        torch.testing.assert_close(fresh.get_parameter(name), param, rtol=0, atol=1e-7)
    torch.testing.assert_close(logits(fresh, IDS), logits(model, IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("stop_at", [1, 3])  # during the warm-up, and after the entries were chosen
def test_top_k_resumes_exactly_from_its_state(tiny_model_dir, tmp_path, stop_at):
    batches = token_batches(5)

    def run(model, sparse, optimizer, steps):
        train_steps(model, optimizer, steps, after_step=lambda: sparse.after_optimizer_step(optimizer))

    model, sparse = _top_k(tiny_model_dir)
    optimizer = _adamw(model, sparse)
    run(model, sparse, optimizer, batches)

    first, first_sparse = _top_k(tiny_model_dir)
    first_optimizer = _adamw(first, first_sparse)
    run(first, first_sparse, first_optimizer, batches[:stop_at])
    save_file(first_sparse.state_dict(), tmp_path / "sparse.safetensors")
    optimizer_state = first_optimizer.state_dict()

    resumed, resumed_sparse = _top_k(tiny_model_dir)
    resumed_optimizer = _adamw(resumed, resumed_sparse)  # built before the state loads, as in the recipe
    with torch.no_grad():  # a method's own checkpoint may restore the trained weights first
        for name, param in resumed_sparse.named_parameters().items():
            param.copy_(first_sparse.named_parameters()[name])
    resumed_sparse.load_state_dict(load_file(tmp_path / "sparse.safetensors"))
    resumed_optimizer.load_state_dict(optimizer_state)
    run(resumed, resumed_sparse, resumed_optimizer, batches[stop_at:])
    for name, param in sparse.named_parameters().items():
        assert torch.equal(param, resumed_sparse.named_parameters()[name]), name
    expected, got = sparse.deltas(), resumed_sparse.deltas()
    assert expected.keys() == got.keys() and len(got) > 0
    for name, delta in expected.items():
        assert torch.equal(delta.delta.indices, got[name].delta.indices)
        assert torch.equal(delta.delta.values, got[name].delta.values)
