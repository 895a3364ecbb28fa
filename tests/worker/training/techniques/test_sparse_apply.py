"""Rebuilding a sparse-trained model: the deltas added to a loaded base, what does not fit refused first."""

from __future__ import annotations

import pytest
import torch

from tests.support.sparse_samples import DOWN, Q, sample_sparse_deltas
from tests.support.tiny_training import load_tiny, logits
from worker.formats.sparse_deltas import ParamDelta, SparseDeltaError, SparseEntries, write_sparse_deltas
from worker.training.techniques.sparse_apply import apply_sparse_deltas


def test_apply_adds_weight_deltas_and_an_added_bias(tiny_model_dir, tmp_path):
    write_sparse_deltas(tmp_path, "top_k", sample_sparse_deltas(), candidate_entries=1)
    base, model = load_tiny(tiny_model_dir), load_tiny(tiny_model_dir)
    apply_sparse_deltas(model, tmp_path)
    down, base_down = model.get_submodule(DOWN), base.get_submodule(DOWN)
    expected = base_down.weight.detach().clone().view(-1)
    expected[[5, 700, 4000]] += torch.tensor([0.5, -1.0, 2.0])
    assert torch.equal(down.weight.detach().view(-1), expected)
    assert base_down.bias is None and isinstance(down.bias, torch.nn.Parameter)
    changed = (down.weight != base_down.weight).sum().item()
    assert changed == 3
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.allclose(logits(model, ids), logits(base, ids))


def test_apply_refuses_what_does_not_fit_and_changes_nothing(tiny_model_dir, tmp_path):
    model = load_tiny(tiny_model_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cases = {
        "lm_head.weight": ("not a linear inside the decoder layers", (model.config.vocab_size, 64)),
        "model.layers.9.mlp.down_proj.weight": ("has no module", (64, 128)),
        f"{Q}.weight": ("has shape", (64, 128)),
    }
    for name, (message, shape) in cases.items():
        folder = tmp_path / name
        deltas = {f"{DOWN}.bias": ParamDelta(torch.ones(64), added=True),
                  name: ParamDelta(SparseEntries(torch.tensor([0]), torch.tensor([1.0]), shape))}
        write_sparse_deltas(folder, "top_k", deltas, candidate_entries=1)
        with pytest.raises(SparseDeltaError, match=message):
            apply_sparse_deltas(model, folder)
    not_added = tmp_path / "not-added"
    write_sparse_deltas(not_added, "bitfit", {f"{DOWN}.bias": ParamDelta(torch.ones(64))}, candidate_entries=64)
    with pytest.raises(SparseDeltaError, match="not marked added"):
        apply_sparse_deltas(model, not_added)
    assert model.get_submodule(DOWN).bias is None
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_4bit_linears_take_bias_deltas_but_refuse_weight_deltas(tiny_model_dir, tmp_path):
    model = load_tiny(tiny_model_dir, quantization="nf4-dq")
    bias_only = tmp_path / "bias"
    write_sparse_deltas(bias_only, "bitfit", {f"{DOWN}.bias": ParamDelta(torch.ones(64), added=True)}, 64)
    ids = torch.tensor([[1, 2, 3, 4]])
    before = logits(model, ids)
    apply_sparse_deltas(model, bias_only)
    assert torch.equal(model.get_submodule(DOWN).bias.detach(), torch.ones(64))
    assert not torch.allclose(logits(model, ids), before)
    weight = tmp_path / "weight"
    write_sparse_deltas(weight, "top_k", {f"{Q}.weight": ParamDelta(
        SparseEntries(torch.tensor([0]), torch.tensor([1.0]), (64, 64)))}, candidate_entries=1)
    with pytest.raises(SparseDeltaError, match="4-bit Linear4bit"):
        apply_sparse_deltas(model, weight)
