"""The sparse-deltas artifact (`patchbay.sparse/v1`): `sparse_config.json` + `sparse_deltas.safetensors`.

A sparse artifact holds, per changed base parameter (a weight or bias of a decoder linear, named
relative to the causal LM, e.g. `model.layers.0.mlp.down_proj.weight`), the change trained - original:
stored dense (key `<name>`) or, when smaller, as sorted flat indices and the values there (keys
`<name>.indices`, `<name>.values`). A bias marked "added" is one the base lacks (BitFit's zero-initialised
bias); its delta is its trained value. The files may sit beside any other kind's artifact.

- Written by training's sparse technique: `write_sparse_deltas`.
- Read for a training reload: `has_sparse_config`, `read_sparse_deltas` (per linear, checked on their own);
  `worker.training.techniques.sparse_apply` adds them to a loaded model.
- Read for serving: `has_any_sparse_file`, `read_served_sparse_deltas` (checked against the served base),
  applied as y = base(x) + x @ dW^T + db.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.adapter_check import PICKLE_SUFFIXES
from worker.formats.files import AdapterLoadError

SPARSE_CONFIG_FILE = "sparse_config.json"
SPARSE_DELTAS_FILE = "sparse_deltas.safetensors"
SPARSE_FORMAT = "patchbay.sparse/v1"
SPARSE_KINDS = ("bitfit", "modules", "top_k")
_PARAM_NAME = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.\w+)*)\.(?P<kind>weight|bias)$")
_INDEX_BYTES = 8  # int64 flat index


class SparseDeltaError(ValueError):
    """A sparse artifact that is malformed or does not fit the model; the message names the problem."""


@dataclass(frozen=True)
class SparseEntries:
    """Some entries of a tensor: sorted flat int64 `indices`, their `values`, and the tensor's `shape`."""

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    def to_dense(self) -> torch.Tensor:
        """The full tensor, zero outside the entries."""
        dense = torch.zeros(math.prod(self.shape), dtype=self.values.dtype, device=self.values.device)
        dense[self.indices] = self.values
        return dense.view(self.shape)


@dataclass(frozen=True)
class ParamDelta:
    """What to write for one base parameter: a dense change or only some entries; `added` for a new bias."""

    delta: torch.Tensor | SparseEntries
    added: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape."""
        return tuple(self.delta.shape)

    @property
    def nnz(self) -> int:
        """How many entries changed (trained): all of a dense delta, the listed ones otherwise."""
        return self.delta.indices.numel() if isinstance(self.delta, SparseEntries) else self.delta.numel()


@dataclass(frozen=True)
class LinearDelta:
    """The change of one decoder linear: `weight` (dense [out, in]) and/or `bias` ([out]), as read."""

    module_name: str
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    bias_added: bool = False
    weight_stored_entries: SparseEntries | None = None  # set when the weight was stored as indices

    @property
    def weight_entries(self) -> SparseEntries | None:
        """The weight delta in sparse form: as stored, or every entry of a dense delta."""
        if self.weight is None or self.weight_stored_entries is not None:
            return self.weight_stored_entries
        flat = self.weight.reshape(-1)
        return SparseEntries(torch.arange(flat.numel()), flat, tuple(self.weight.shape))


def write_sparse_deltas(
    folder: Path | str, kind: str, deltas: Mapping[str, ParamDelta], candidate_entries: int,
    modules: list[str] | None = None,
) -> dict:
    """Write both artifact files into `folder` (created if needed) and return the config written.

    `modules` is the spec's module selection (kept in the config: on a 4-bit base, training kept those
    modules in full precision, and a rebuild must do the same).

    Each parameter is stored as indices when that takes fewer bytes than dense. Values are float32,
    so adding them to a bf16 or fp32 base reproduces the trained weights.
    """
    if kind not in SPARSE_KINDS:
        raise ValueError(f"unknown sparse kind {kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    parameters: dict[str, dict] = {}
    for name, param_delta in deltas.items():
        _check_name(name, added=param_delta.added)
        shape, nnz = param_delta.shape, param_delta.nnz
        numel = math.prod(shape)
        use_indices = nnz * (_INDEX_BYTES + 4) < numel * 4
        if use_indices:
            entries = _as_entries(param_delta.delta)
            tensors[f"{name}.indices"] = entries.indices.to("cpu", torch.int64).contiguous()
            tensors[f"{name}.values"] = entries.values.detach().to("cpu", torch.float32).contiguous()
        else:
            dense = param_delta.delta
            dense = dense.to_dense() if isinstance(dense, SparseEntries) else dense
            tensors[name] = dense.detach().to("cpu", torch.float32).contiguous()
        parameters[name] = {
            "shape": list(shape),
            "storage": "indices" if use_indices else "dense",
            "nnz": nnz,
            "added": param_delta.added,
        }
    config = {
        "format": SPARSE_FORMAT,
        "kind": kind,
        "parameters": parameters,
        "trainable_entries": sum(p["nnz"] for p in parameters.values()),
        "candidate_entries": int(candidate_entries),
        "modules": list(modules) if modules else None,
    }
    save_file(tensors, folder / SPARSE_DELTAS_FILE)
    (folder / SPARSE_CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return config


def _as_entries(delta: torch.Tensor | SparseEntries) -> SparseEntries:
    if isinstance(delta, SparseEntries):
        order = torch.argsort(delta.indices)
        return SparseEntries(delta.indices[order], delta.values[order], delta.shape)
    flat = delta.reshape(-1)
    return SparseEntries(torch.arange(flat.numel(), device=flat.device), flat, tuple(delta.shape))


def _check_name(name: str, *, added: bool) -> re.Match:
    match = _PARAM_NAME.match(name)
    if match is None:
        raise SparseDeltaError(f"{name!r} is not the name of a weight or bias")
    if added and match["kind"] != "bias":
        raise SparseDeltaError(f"{name}: only a bias can be 'added'")
    return match


def has_sparse_config(folder: Path | str) -> bool:
    """Whether `folder` holds a sparse artifact as training writes it (its `sparse_config.json`)."""
    return (Path(folder) / SPARSE_CONFIG_FILE).is_file()


def has_any_sparse_file(folder: Path | str) -> bool:
    """Whether `folder` holds either sparse file (serving reads it then: a lone file is an error there)."""
    folder = Path(folder)
    return (folder / SPARSE_CONFIG_FILE).is_file() or (folder / SPARSE_DELTAS_FILE).is_file()


def read_sparse_deltas(folder: Path | str) -> dict[str, LinearDelta]:
    """Read and validate a sparse artifact; return its deltas per module name (dense, float32, on CPU).

    Raises `SparseDeltaError` for pickle files, a missing or malformed file, names that are not
    weights/biases, tensors that disagree with the config, shapes that do not fit together, indices
    out of range or unsorted, and values that are not finite.
    """
    folder = Path(folder)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise SparseDeltaError(f"pickle files are refused ({', '.join(pickles)}); only safetensors is accepted")
    config = read_sparse_config(folder)
    try:
        tensors = load_file(folder / SPARSE_DELTAS_FILE)
    except FileNotFoundError:
        raise SparseDeltaError(f"{SPARSE_DELTAS_FILE} is missing") from None
    except (SafetensorError, OSError) as error:
        raise SparseDeltaError(f"{SPARSE_DELTAS_FILE} is not a valid safetensors file: {error}") from None

    expected_keys, parts = set(), {}
    for name, entry in config["parameters"].items():
        storage = _check_entry(name, entry)
        keys = [name] if storage == "dense" else [f"{name}.indices", f"{name}.values"]
        expected_keys.update(keys)
        missing = [key for key in keys if key not in tensors]
        if missing:
            raise SparseDeltaError(f"{SPARSE_DELTAS_FILE} lacks {missing[0]!r}, listed in {SPARSE_CONFIG_FILE}")
        parts[name] = _read_param(name, entry, tensors)
    unexpected = sorted(set(tensors) - expected_keys)
    if unexpected:
        raise SparseDeltaError(f"{SPARSE_DELTAS_FILE} has tensors not listed in {SPARSE_CONFIG_FILE}: {unexpected[:3]}")
    return _group_by_module(config["parameters"], parts)


def read_sparse_config(folder: Path | str) -> dict:
    """The validated `sparse_config.json` of an artifact folder."""
    folder = Path(folder)
    try:
        config = json.loads((folder / SPARSE_CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise SparseDeltaError(f"{SPARSE_CONFIG_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SparseDeltaError(f"{SPARSE_CONFIG_FILE} is not valid JSON") from None
    if not isinstance(config, dict) or config.get("format") != SPARSE_FORMAT:
        raise SparseDeltaError(f"{SPARSE_CONFIG_FILE}: format must be {SPARSE_FORMAT!r}")
    if config.get("kind") not in SPARSE_KINDS:
        raise SparseDeltaError(f"{SPARSE_CONFIG_FILE}: kind must be one of {', '.join(SPARSE_KINDS)}")
    if not isinstance(config.get("parameters"), dict):
        raise SparseDeltaError(f"{SPARSE_CONFIG_FILE}: 'parameters' must be an object")
    return config


def _check_entry(name: str, entry) -> str:
    if not isinstance(entry, dict):
        raise SparseDeltaError(f"{SPARSE_CONFIG_FILE}: parameters[{name!r}] must be an object")
    added = entry.get("added", False)
    if not isinstance(added, bool):
        raise SparseDeltaError(f"{name}: 'added' must be true or false")
    match = _check_name(name, added=added)
    shape = entry.get("shape")
    want_dims = 2 if match["kind"] == "weight" else 1
    if (not isinstance(shape, list) or len(shape) != want_dims
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise SparseDeltaError(f"{name}: shape must be {want_dims} positive integers, got {shape!r}")
    storage = entry.get("storage")
    if storage not in ("dense", "indices"):
        raise SparseDeltaError(f"{name}: storage must be 'dense' or 'indices', got {storage!r}")
    nnz = entry.get("nnz")
    if not isinstance(nnz, int) or isinstance(nnz, bool) or not 0 <= nnz <= math.prod(shape):
        raise SparseDeltaError(f"{name}: nnz must be an integer between 0 and {math.prod(shape)}")
    return storage


def _read_param(name: str, entry: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor | SparseEntries:
    shape = tuple(entry["shape"])
    if entry["storage"] == "dense":
        dense = tensors[name]
        if tuple(dense.shape) != shape:
            raise SparseDeltaError(f"{name}: stored shape {list(dense.shape)} differs from the config's {list(shape)}")
        return _finite_floats(name, dense)
    indices, values = tensors[f"{name}.indices"], tensors[f"{name}.values"]
    if indices.dtype != torch.int64 or indices.dim() != 1:
        raise SparseDeltaError(f"{name}.indices must be a 1-D int64 tensor")
    if values.dim() != 1 or values.numel() != indices.numel():
        raise SparseDeltaError(f"{name}.values must be 1-D with one value per index")
    if indices.numel() != entry["nnz"]:
        raise SparseDeltaError(f"{name}: {indices.numel()} indices stored, but nnz is {entry['nnz']}")
    if indices.numel():
        if int(indices[0]) < 0 or int(indices[-1]) >= math.prod(shape):
            raise SparseDeltaError(f"{name}.indices fall outside a parameter of shape {list(shape)}")
        if not bool((indices[1:] > indices[:-1]).all()):
            raise SparseDeltaError(f"{name}.indices must be sorted and distinct")
    return SparseEntries(indices, _finite_floats(f"{name}.values", values), shape)


def _finite_floats(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise SparseDeltaError(f"{name} must hold floating-point values, not {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise SparseDeltaError(f"{name} holds values that are not finite")
    return tensor.float()


def _group_by_module(
    parameters: dict[str, dict], parts: dict[str, torch.Tensor | SparseEntries]
) -> dict[str, LinearDelta]:
    fields: dict[str, dict] = {}
    for name, part in parts.items():
        match = _PARAM_NAME.match(name)
        module, kind = match["module"], match["kind"]
        slot = fields.setdefault(module, {"module_name": module, "weight": None, "bias": None})
        if kind == "weight":
            slot["weight"] = part.to_dense() if isinstance(part, SparseEntries) else part
            if isinstance(part, SparseEntries):
                slot["weight_stored_entries"] = part
        else:
            slot["bias"] = part.to_dense() if isinstance(part, SparseEntries) else part
            slot["bias_added"] = parameters[name]["added"]
    for module, slot in fields.items():
        weight, bias = slot["weight"], slot["bias"]
        if weight is not None and bias is not None and weight.shape[0] != bias.shape[0]:
            raise SparseDeltaError(f"{module}: bias delta has {bias.shape[0]} entries for {weight.shape[0]} outputs")
    return {module: LinearDelta(**slot) for module, slot in fields.items()}


# ---- serving -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseDelta:
    """A change of one base linear: y = W x + b + weight x + bias (either part may be absent)."""

    weight: torch.Tensor | None  # [out_features, in_features]
    bias: torch.Tensor | None  # [out_features]


def read_served_sparse_deltas(
    folder: Path, linear_shapes: Mapping[str, tuple[int, int]], linear_has_bias: Mapping[str, bool]
) -> dict[str, DenseDelta]:
    """The dense deltas per linear module name, checked against the served base's linears.

    Raises `AdapterLoadError` (the serving readers' error) for anything `read_sparse_deltas` refuses too.
    """
    try:
        deltas = read_sparse_deltas(folder)
    except SparseDeltaError as exc:
        raise AdapterLoadError(f"sparse deltas: {exc}") from exc
    served = {}
    for module, delta in deltas.items():
        if module not in linear_shapes:
            raise AdapterLoadError(f"sparse delta for {module!r}: the base has no such decoder linear")
        in_features, out_features = linear_shapes[module]
        if delta.weight is not None and tuple(delta.weight.shape) != (out_features, in_features):
            raise AdapterLoadError(f"sparse delta for {module!r}: weight {tuple(delta.weight.shape)} does not fit "
                                   f"the base linear ({in_features} -> {out_features})")
        if delta.bias is not None:
            if tuple(delta.bias.shape) != (out_features,):
                raise AdapterLoadError(f"sparse delta for {module!r}: bias {tuple(delta.bias.shape)} does not fit "
                                       f"{out_features} outputs")
            if not delta.bias_added and not linear_has_bias[module]:
                raise AdapterLoadError(f"sparse delta for {module!r}: the base linear has no bias to change "
                                       "(and the delta is not marked 'added')")
        served[module] = DenseDelta(weight=delta.weight, bias=delta.bias)
    return served
