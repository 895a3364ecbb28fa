"""Sample sparse deltas for the tiny model: the sparse-deltas format tests and the reload tests share them."""

from __future__ import annotations

import torch

from worker.formats.sparse_deltas import ParamDelta, SparseEntries

DOWN = "model.layers.0.mlp.down_proj"  # [64, 128]
Q = "model.layers.1.self_attn.q_proj"  # [64, 64]


def sample_sparse_deltas() -> dict[str, ParamDelta]:
    """Three entries of DOWN's weight (stored as indices), an added DOWN bias, and half of Q's weight (dense)."""
    generator = torch.Generator().manual_seed(0)
    few = torch.tensor([5, 700, 4000])
    many = torch.arange(0, 64 * 64, 2)  # half the entries: dense is smaller
    return {
        f"{DOWN}.weight": ParamDelta(SparseEntries(few, torch.tensor([0.5, -1.0, 2.0]), (64, 128))),
        f"{DOWN}.bias": ParamDelta(torch.randn(64, generator=generator), added=True),
        f"{Q}.weight": ParamDelta(SparseEntries(many, torch.randn(many.numel(), generator=generator), (64, 64))),
    }
