"""The sparse-deltas files: storage choice, reading back, validation, and the serving reader's checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.sparse_samples import DOWN, Q, sample_sparse_deltas
from worker.formats.files import AdapterLoadError
from worker.formats.sparse_deltas import (
    SPARSE_CONFIG_FILE,
    SPARSE_DELTAS_FILE,
    SparseDeltaError,
    has_any_sparse_file,
    has_sparse_config,
    read_served_sparse_deltas,
    read_sparse_deltas,
    write_sparse_deltas,
)


def test_storage_is_chosen_per_parameter_and_reads_back(tmp_path):
    deltas = sample_sparse_deltas()
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
    config = write_sparse_deltas(tmp_path, "top_k", sample_sparse_deltas(), candidate_entries=1)
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


def test_training_reload_looks_for_the_config_serving_for_either_file(tmp_path):
    write_sparse_deltas(tmp_path, "top_k", sample_sparse_deltas(), candidate_entries=1)
    assert has_sparse_config(tmp_path) and has_any_sparse_file(tmp_path)
    (tmp_path / SPARSE_CONFIG_FILE).unlink()
    assert not has_sparse_config(tmp_path) and has_any_sparse_file(tmp_path)
    with pytest.raises(AdapterLoadError, match="sparse deltas: sparse_config.json is missing"):
        read_served_sparse_deltas(tmp_path, {}, {})


def test_served_deltas_are_checked_against_the_base(tmp_path):
    write_sparse_deltas(tmp_path, "top_k", sample_sparse_deltas(), candidate_entries=1)
    shapes = {DOWN: (128, 64), Q: (64, 64)}
    served = read_served_sparse_deltas(tmp_path, shapes, {DOWN: False, Q: False})
    assert served[DOWN].weight.shape == (64, 128) and served[Q].bias is None
    with pytest.raises(AdapterLoadError, match="no such decoder linear"):
        read_served_sparse_deltas(tmp_path, {DOWN: (128, 64)}, {DOWN: False})
    with pytest.raises(AdapterLoadError, match="does not fit"):
        read_served_sparse_deltas(tmp_path, {**shapes, Q: (64, 32)}, {DOWN: False, Q: False})
