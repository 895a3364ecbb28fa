"""Read an artifact's sparse deltas (`sparse_config.json` + `sparse_deltas.safetensors`) per base linear.

The format and its validation come from `worker.sparse_deltas` (the training side, `patchbay.sparse/v1`);
here the deltas are also checked against the served base's linears. Served as y = base(x) + x dW^T + db.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.inference.adapter_files import AdapterLoadError
from worker.sparse_deltas import SPARSE_CONFIG_FILE, SPARSE_DELTAS_FILE, SparseDeltaError
from worker.sparse_deltas import read_sparse_deltas as read_sparse_files


@dataclass(frozen=True)
class DenseDelta:
    """A change of one base linear: y = W x + b + weight x + bias (either part may be absent)."""

    weight: torch.Tensor | None  # [out_features, in_features]
    bias: torch.Tensor | None  # [out_features]


def has_sparse_deltas(folder: Path) -> bool:
    """Whether the artifact carries sparse deltas (either file: a lone one is an error when read)."""
    return (folder / SPARSE_CONFIG_FILE).is_file() or (folder / SPARSE_DELTAS_FILE).is_file()


def read_sparse_deltas(
    folder: Path, linear_shapes: Mapping[str, tuple[int, int]], linear_has_bias: Mapping[str, bool]
) -> dict[str, DenseDelta]:
    """The dense deltas per linear module name, checked against the base's linears."""
    try:
        deltas = read_sparse_files(folder)
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
