"""The sparse artifact files: storage choice, reading back, validation, and applying to a base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.tiny_training import load_tiny, logits
from worker.sparse_deltas import (
    SPARSE_CONFIG_FILE,
    SPARSE_DELTAS_FILE,
    ParamDelta,
    SparseDeltaError,
    SparseEntries,
    apply_sparse_deltas,
    read_sparse_deltas,
    write_sparse_deltas,
)

DOWN = "model.layers.0.mlp.down_proj"  # [64, 128]
Q = "model.layers.1.self_attn.q_proj"  # [64, 64]


def _sample_deltas() -> dict[str, ParamDelta]:
    generator = torch.Generator().manual_seed(0)
    few = torch.tensor([5, 700, 4000])
    many = torch.arange(0, 64 * 64, 2)  # half the entries: dense is smaller
    return {
        f"{DOWN}.weight": ParamDelta(SparseEntries(few, torch.tensor([0.5, -1.0, 2.0]), (64, 128))),
        f"{DOWN}.bias": ParamDelta(torch.randn(64, generator=generator), added=True),
        f"{Q}.weight": ParamDelta(SparseEntries(many, torch.randn(many.numel(), generator=generator), (64, 64))),
    }


def test_storage_is_chosen_per_parameter_and_reads_back(tmp_path):
    deltas = _sample_deltas()
    config = write_sparse_deltas(tmp_path, "top_k", deltas, candidate_entries=12288)
    params = config["parameters"]
    assert params[f"{DOWN}.weight"] == {"shape": [64, 128], "storage": "indices", "nnz": 3, "added": False}
    assert params[f"{Q}.weight"]["storage"] == "dense" and params[f"{Q}.weight"]["nnz"] == 2048
    assert params[f"{DOWN}.bias"] == {"shape": [64], "storage": "dense", "nnz": 64, "added": True}
    assert config["trainable_entries"] == 3 + 64 + 2048 and config["candidate_entries"] == 12288
    assert json.loads((tmp_path / SPARSE_CONFIG_FILE).read_text()) == config
    assert set(load_file(tmp_path / SPARSE_DELTAS_FILE)) == {
        f"{DOWN}.weight.indices", f"{DOWN}.weight.values", f"{DOWN}.bias", f"{Q}.weight"}

    read = read_sparse_deltas(tmp_path)
    down, q = read[DOWN], read[Q]
    assert torch.equal(down.weight, deltas[f"{DOWN}.weight"].delta.to_dense())
    assert torch.equal(down.weight_entries.indices, torch.tensor([5, 700, 4000]))
    assert down.bias_added and torch.equal(down.bias, deltas[f"{DOWN}.bias"].delta)
    assert q.bias is None and torch.equal(q.weight, deltas[f"{Q}.weight"].delta.to_dense())
    assert q.weight_entries.indices.numel() == 64 * 64  # a dense delta in sparse form: every entry


def test_apply_adds_weight_deltas_and_an_added_bias(tiny_model_dir, tmp_path):
    write_sparse_deltas(tmp_path, "top_k", _sample_deltas(), candidate_entries=1)
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


def _corrupt(folder, *, config=None, tensors=None):
    if config is not None:
        (folder / SPARSE_CONFIG_FILE).write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, folder / SPARSE_DELTAS_FILE)


@pytest.mark.parametrize("problem, message", [
    ("pickle", "pickle files are refused"),
    ("nan", "not finite"),
    ("shape", "differs from the config"),
    ("unsorted", "sorted and distinct"),
    ("out_of_range", "fall outside"),
    ("extra_tensor", "not listed"),
    ("name", "not the name of a weight or bias"),
    ("format", "format must be"),
])
def test_malformed_artifacts_are_refused(tmp_path, problem, message):
    config = write_sparse_deltas(tmp_path, "top_k", _sample_deltas(), candidate_entries=1)
    tensors = load_file(tmp_path / SPARSE_DELTAS_FILE)
    if problem == "pickle":
        (tmp_path / "sparse_deltas.bin").write_bytes(b"\x80\x04")
    elif problem == "nan":
        tensors[f"{DOWN}.bias"][3] = float("nan")
        _corrupt(tmp_path, tensors=tensors)
    elif problem == "shape":
        tensors[f"{Q}.weight"] = torch.zeros(64, 65)
        _corrupt(tmp_path, tensors=tensors)
    elif problem in ("unsorted", "out_of_range"):
        bad = [700, 5, 4000] if problem == "unsorted" else [5, 700, 64 * 128]
        tensors[f"{DOWN}.weight.indices"] = torch.tensor(bad)
        _corrupt(tmp_path, tensors=tensors)
    elif problem == "extra_tensor":
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(2, 2)
        _corrupt(tmp_path, tensors=tensors)
    elif problem == "name":
        config["parameters"]["model.layers.0.mlp.down_proj.scale"] = config["parameters"].pop(f"{DOWN}.bias")
        _corrupt(tmp_path, config=config)
    else:
        _corrupt(tmp_path, config={**config, "format": "pickle/v0"})
    with pytest.raises(SparseDeltaError, match=message):
        read_sparse_deltas(tmp_path)


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
