"""Batched multi-LoRA linears with preallocated adapter slots, in the manner of Punica and S-LoRA.

Each target linear keeps `lora_A: [n_slots, max_rank, in]`, `lora_B: [n_slots, out, max_rank]` and a
scaling per slot. Before a forward pass the caller routes every batch row to a slot (or to none);
the wrapper then adds each row's own LoRA delta to the shared base output. Loading an adapter only
copies its tensors into a free slot (ranks below `max_rank` are zero-padded).

How the delta is computed (`LoraSlotBank.strategy`), measured on 2 CPU cores in bench/serving.py:
- "packed" (default): the active slots' factors are packed side by side once per batch composition
  (exact ranks, cached), and each row masks in its own columns: two dense matmuls per linear.
- "grouped": rows are grouped by slot, two small matmuls per distinct adapter.
- "gathered": per-row gathered A/B and `bmm` (Punica's BGMV shape), gathering every step.

The same wrappers apply the other per-linear adapter terms per row, so that those adapters share
a batch with LoRA rows: IA3 gains (a per-slot vector gathered per row, like the DoRA gain: inputs
of feedforward modules, outputs of the others) and dense weight deltas (LoHa/LoKr/HRA, sparse
deltas: x dW^T for the rows of each such slot via index_select/index_add, and a per-row bias delta).
In one forward: x' = x * g_in; y = base(x') + x' dW^T + db + LoRA(x') (DoRA-scaled); y *= g_out.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from worker.formats.files import AdapterLoadError
from worker.formats.ia3 import Ia3Gain
from worker.formats.lora import LoraAdapter, LoraModuleWeights, read_lora_adapter
from worker.formats.sparse_deltas import DenseDelta
from worker.model_parts import decoder_layers

__all__ = [
    "AdapterLoadError",
    "LoraSlotBank",
    "SlottedLoraLinear",
    "install_lora_slots",
    "target_linear_names",
]

STRATEGIES = ("packed", "grouped", "gathered")


@dataclass(frozen=True)
class PackedLayout:
    """Where each active slot's rank columns sit in the packed factors."""

    key: tuple[tuple[int, int], ...]  # (slot, version) pairs; a reload changes the version
    slots: tuple[int, ...]
    ranks: tuple[int, ...]
    offsets: tuple[int, ...]
    width: int


@dataclass(frozen=True)
class RowRouting:
    """The slot of every batch row for one forward pass, with the masks the kernels need."""

    row_slots: tuple[int | None, ...]
    active_slots: tuple[int, ...]
    row_mask: torch.Tensor | None  # [rows, 1, 1]: 1.0 where the row uses the single active slot
    layout: PackedLayout | None  # set when more than one slot is active
    col_mask: torch.Tensor | None  # [rows, 1, width]: 1.0 on the row's own packed columns
    rows_of_slot: dict[int, torch.Tensor] | None = None  # for the "grouped" strategy
    row_index: torch.Tensor | None = None  # [rows] slot per row, 0 for none ("gathered")
    row_active: torch.Tensor | None = None  # [rows] 1.0 where the row has a slot ("gathered")
    gain_index: torch.Tensor | None = None  # [rows] DoRA gain row: the slot, or n_slots (gain 1) for none
    extra_slots: tuple[int, ...] = ()  # routed slots with terms other than LoRA (IA3, deltas, bottleneck)
    rows_of: dict[int, torch.Tensor | None] | None = None  # rows of each extra slot; None: every row


class _RoutingHolder:
    """The routing shared by every wrapper of one model, per thread (set by `LoraSlotBank.route`).

    Per thread, so that a forward pass on another thread (outside `route`) sees the plain base.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self.strategy = "packed"

    @property
    def current(self) -> RowRouting | None:
        return getattr(self._local, "routing", None)

    @current.setter
    def current(self, routing: RowRouting | None) -> None:
        self._local.routing = routing


class SlottedLoraLinear(nn.Module):
    """A base linear (`nn.Linear` or bitsandbytes `Linear4bit`) plus LoRA slots; each batch row picks its slot."""

    def __init__(
        self, base_layer: nn.Linear, routing: _RoutingHolder, n_slots: int, max_rank: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._routing = routing
        device = base_layer.weight.device
        in_features, out_features = base_layer.in_features, base_layer.out_features
        self.register_buffer(
            "lora_A", torch.zeros(n_slots, max_rank, in_features, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "lora_B", torch.zeros(n_slots, out_features, max_rank, dtype=dtype, device=device), persistent=False
        )
        # DoRA: row n_slots stays all ones (rows without an adapter, or plain LoRA slots).
        self.register_buffer("dora_gain", torch.ones(n_slots + 1, out_features, dtype=dtype, device=device),
                             persistent=False)
        self.slot_has_dora = [False] * n_slots
        # IA3 gains and bias deltas: row n_slots is the identity, for rows of other slots.
        self.register_buffer("ia3_in", torch.ones(n_slots + 1, in_features, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("ia3_out", torch.ones(n_slots + 1, out_features, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("bias_delta", torch.zeros(n_slots + 1, out_features, dtype=dtype, device=device),
                             persistent=False)
        self.slot_ia3_in = [False] * n_slots
        self.slot_ia3_out = [False] * n_slots
        self.slot_bias_delta = [False] * n_slots
        self.weight_deltas: dict[int, torch.Tensor] = {}  # slot -> dense dW [out, in]
        self.slot_ranks = [0] * n_slots
        self.slot_scaling = [0.0] * n_slots
        self._packed_key: tuple | None = None
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def in_features(self) -> int:
        """Input width of the base linear."""
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        """Output width of the base linear."""
        return self.base_layer.out_features

    @torch.no_grad()
    def write_slot(self, slot: int, weights: LoraModuleWeights | None) -> None:
        """Copy one module's LoRA factors into `slot` (zero-padded to max rank), or clear it with None."""
        self.slot_ranks[slot] = 0
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.dora_gain[slot].fill_(1.0)
        self.slot_has_dora[slot] = False
        if weights is None:
            self.slot_scaling[slot] = 0.0
            return
        rank = weights.rank
        self.lora_A[slot, :rank].copy_(weights.lora_A)
        self.lora_B[slot, :, :rank].copy_(weights.lora_B)
        self.slot_scaling[slot] = weights.scaling
        self.slot_ranks[slot] = rank
        if weights.magnitude is not None:
            weight = dense_weight(self.base_layer)
            if slot in self.weight_deltas:  # DoRA normalises the weight as trained, sparse deltas included
                weight = weight + self.weight_deltas[slot].float()
            self.dora_gain[slot].copy_(dora_gain(weight, weights))
            self.slot_has_dora[slot] = True

    @torch.no_grad()
    def write_extras(self, slot: int, ia3: Ia3Gain | None, delta: DenseDelta | None) -> None:
        """Set (or clear, with None) the slot's IA3 gain and weight delta; before `write_slot` (DoRA uses the delta)."""
        self.ia3_in[slot].fill_(1.0)
        self.ia3_out[slot].fill_(1.0)
        self.bias_delta[slot].zero_()
        self.slot_ia3_in[slot] = self.slot_ia3_out[slot] = self.slot_bias_delta[slot] = False
        self.weight_deltas.pop(slot, None)
        if ia3 is not None:
            (self.ia3_in if ia3.on_input else self.ia3_out)[slot].copy_(ia3.gain)
            (self.slot_ia3_in if ia3.on_input else self.slot_ia3_out)[slot] = True
        if delta is not None and delta.weight is not None:
            self.weight_deltas[slot] = delta.weight.to(self.lora_A.device, self.lora_A.dtype)
        if delta is not None and delta.bias is not None:
            self.bias_delta[slot].copy_(delta.bias)
            self.slot_bias_delta[slot] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus each row's own adapter terms (nothing for rows without a slot)."""
        routing = self._routing.current
        if routing is None or not (routing.active_slots or routing.extra_slots):
            return self.base_layer(x)
        extra = routing.extra_slots
        if any(self.slot_ia3_in[slot] for slot in extra):
            x = x * self._row_vectors(self.ia3_in, routing, x)
        out = self.base_layer(x)
        if extra:
            out = self._add_weight_deltas(out, x, routing)
        if routing.active_slots:
            out = self._add_lora(out, x, routing)
        if any(self.slot_ia3_out[slot] for slot in extra):
            out = out * self._row_vectors(self.ia3_out, routing, out)
        return out

    @staticmethod
    def _row_vectors(table: torch.Tensor, routing: RowRouting, like: torch.Tensor) -> torch.Tensor:
        """Each row's vector from a per-slot table (row n_slots for rows without a slot), broadcastable to `like`."""
        rows = table[routing.gain_index].to(like.dtype)
        return rows.view(rows.shape[0], *([1] * (like.ndim - 2)), rows.shape[-1])

    def _add_weight_deltas(self, out: torch.Tensor, x: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        """x dW^T for the rows of each slot with a dense delta here, then each row's bias delta."""
        for slot in routing.extra_slots:
            weight = self.weight_deltas.get(slot)
            if weight is None:
                continue
            rows = routing.rows_of[slot]
            inputs = x if rows is None else x.index_select(0, rows)
            delta = nn.functional.linear(inputs.to(weight.dtype), weight).to(out.dtype)
            out = out + delta if rows is None else out.index_add(0, rows, delta)
        if any(self.slot_bias_delta[slot] for slot in routing.extra_slots):
            out = out + self._row_vectors(self.bias_delta, routing, out)
        return out

    def _add_lora(self, out: torch.Tensor, x: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        """Each row's scaling * B @ A @ x of its slot, with DoRA's rescaling for DoRA slots."""
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        strategy = self._routing.strategy
        if len(routing.active_slots) == 1 and strategy != "gathered":
            delta = self._single_slot_delta(x, routing)
        elif strategy == "packed":
            delta = self._packed_delta(x, routing)
        elif strategy == "grouped":
            return self._apply_dora(self._add_grouped(out, x, routing), routing)
        else:
            delta = self._gathered_delta(x, routing)
        if delta is not None:
            out = out + delta.to(out.dtype)
        return self._apply_dora(out, routing)

    def _apply_dora(self, out: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        """DoRA rows: y = bias + gain * (W x + s B A x), with gain = magnitude / ||W + s B A|| per output."""
        if not any(self.slot_has_dora[slot] for slot in routing.active_slots):
            return out
        gain = self.dora_gain[routing.gain_index].to(out.dtype)
        gain = gain.view(gain.shape[0], *([1] * (out.ndim - 2)), gain.shape[-1])
        bias = self.base_layer.bias
        unbiased = out if bias is None else out - bias.to(out.dtype)
        if any(self.slot_bias_delta[slot] for slot in routing.extra_slots):  # the bias as trained
            unbiased = unbiased - self._row_vectors(self.bias_delta, routing, out)
        return out + (gain - 1) * unbiased

    def _single_slot_delta(self, x: torch.Tensor, routing: RowRouting) -> torch.Tensor | None:
        slot = routing.active_slots[0]
        rank = self.slot_ranks[slot]
        if rank == 0:
            return None
        hidden = nn.functional.linear(x, self.lora_A[slot, :rank])
        if routing.row_mask is not None:
            hidden = hidden * routing.row_mask
        return nn.functional.linear(hidden, self.lora_B[slot, :, :rank]) * self.slot_scaling[slot]

    def _packed_delta(self, x: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        packed_a, packed_b = self._packed_factors(routing.layout)
        hidden = nn.functional.linear(x, packed_a) * routing.col_mask
        return nn.functional.linear(hidden, packed_b)

    def _packed_factors(self, layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """The active slots' A rows and (scaled) B columns side by side, cached per layout."""
        if self._packed_key != layout.key:
            a_parts, b_parts = [], []
            for slot, rank in zip(layout.slots, layout.ranks):
                a_parts.append(self.lora_A[slot, :rank])
                b_parts.append(self.lora_B[slot, :, :rank] * self.slot_scaling[slot])
            self._packed = (torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1).contiguous())
            self._packed_key = layout.key
        return self._packed

    def _add_grouped(self, out: torch.Tensor, x: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        for slot in routing.active_slots:
            rank = self.slot_ranks[slot]
            if rank == 0:
                continue
            rows = routing.rows_of_slot[slot]
            hidden = nn.functional.linear(x.index_select(0, rows), self.lora_A[slot, :rank])
            delta = nn.functional.linear(hidden, self.lora_B[slot, :, :rank]) * self.slot_scaling[slot]
            out.index_add_(0, rows, delta.to(out.dtype))
        return out

    def _gathered_delta(self, x: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        rank = max(self.slot_ranks[s] for s in routing.active_slots)
        index = routing.row_index
        scaling = torch.tensor(self.slot_scaling, dtype=x.dtype, device=x.device)
        scale = (scaling[index] * routing.row_active).view(-1, 1, 1)
        gathered_a = self.lora_A[index, :rank]  # [rows, rank, in]
        gathered_b = self.lora_B[index, :, :rank]  # [rows, out, rank]
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        hidden = torch.bmm(flat, gathered_a.transpose(1, 2)) * scale
        return torch.bmm(hidden, gathered_b.transpose(1, 2)).view(*x.shape[:-1], -1)


class LoraSlotBank:
    """Every slotted linear of one model: load adapters into slots and route batch rows to them."""

    def __init__(self, layers: dict[str, SlottedLoraLinear], routing: _RoutingHolder, n_slots: int, max_rank: int):
        self.layers = layers
        self.n_slots = n_slots
        self.max_rank = max_rank
        self._routing = routing
        self._slot_rank = [0] * n_slots
        self._versions = [0] * n_slots
        self._has_extras = [False] * n_slots
        self._layout: PackedLayout | None = None
        self._write_lock = threading.Lock()
        first = next(iter(layers.values()))
        self.device = first.lora_A.device
        self.dtype = first.lora_A.dtype

    @property
    def strategy(self) -> str:
        """How the batched LoRA delta is computed: "packed", "grouped" or "gathered" (see the module doc)."""
        return self._routing.strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        if value not in STRATEGIES:
            raise ValueError(f"unknown LoRA strategy {value!r}; choose one of {STRATEGIES}")
        self._routing.strategy = value

    @property
    def current_routing(self) -> RowRouting | None:
        """The routing of the forward pass running on this thread (None outside `route`)."""
        return self._routing.current

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every slotted module, by its name in the model."""
        return {name: (layer.in_features, layer.out_features) for name, layer in self.layers.items()}

    def read_adapter(self, folder: Path | str) -> LoraAdapter:
        """Read and validate a PEFT LoRA folder against these slots (raises `AdapterLoadError`)."""
        return read_lora_adapter(folder, self.linear_shapes(), self.max_rank)

    def write_slot(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy a validated adapter into `slot`; the slot must not be routed to while this runs."""
        self.write_linear_terms(slot, adapter.modules)

    def write_linear_terms(
        self,
        slot: int,
        lora: Mapping[str, LoraModuleWeights],
        ia3: Mapping[str, Ia3Gain] | None = None,
        deltas: Mapping[str, DenseDelta] | None = None,
        block_terms: bool = False,
    ) -> None:
        """Set every per-linear term of `slot` (modules not named get none); `block_terms`: the slot has
        terms outside the linears (bottleneck blocks), so that routing lists its rows."""
        self._check_slot(slot)
        ia3, deltas = ia3 or {}, deltas or {}
        with self._write_lock:
            self._slot_rank[slot] = 0
            for name, layer in self.layers.items():
                layer.write_extras(slot, ia3.get(name), deltas.get(name))
                layer.write_slot(slot, lora.get(name))
            self._versions[slot] += 1
            self._slot_rank[slot] = max((w.rank for w in lora.values()), default=0)
            self._has_extras[slot] = bool(ia3 or deltas or block_terms)

    def load_slot(self, slot: int, folder: Path | str) -> LoraAdapter:
        """Read, validate and copy the adapter in `folder` into `slot`."""
        adapter = self.read_adapter(folder)
        self.write_slot(slot, adapter)
        return adapter

    def clear_slot(self, slot: int) -> None:
        """Zero `slot` so that it contributes nothing."""
        self._check_slot(slot)
        with self._write_lock:
            self._slot_rank[slot] = 0
            for layer in self.layers.values():
                layer.write_extras(slot, None, None)
                layer.write_slot(slot, None)
            self._versions[slot] += 1
            self._has_extras[slot] = False

    def slot_rank(self, slot: int) -> int:
        """The rank of the adapter in `slot` (0 when empty)."""
        return self._slot_rank[slot]

    @contextmanager
    def route(self, row_slots: Sequence[int | None]) -> Iterator[RowRouting]:
        """Within this block, batch row i of every forward uses slot `row_slots[i]` (None: base only)."""
        routing = self._build_routing(tuple(row_slots))
        self._routing.current = routing
        try:
            yield routing
        finally:
            self._routing.current = None

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"slot {slot} is out of range (0..{self.n_slots - 1})")

    def _build_routing(self, row_slots: tuple[int | None, ...]) -> RowRouting:
        routing = self._route_rows(row_slots)
        gain_index = torch.tensor([self.n_slots if s is None else s for s in row_slots], device=self.device)
        extra = tuple(sorted({s for s in row_slots if s is not None and self._has_extras[s]}))
        rows_of = {}
        for slot in extra:
            rows = [i for i, s in enumerate(row_slots) if s == slot]
            rows_of[slot] = None if len(rows) == len(row_slots) else torch.tensor(rows, device=self.device)
        return dataclasses.replace(routing, gain_index=gain_index, extra_slots=extra, rows_of=rows_of)

    def _route_rows(self, row_slots: tuple[int | None, ...]) -> RowRouting:
        for slot in row_slots:
            if slot is not None:
                self._check_slot(slot)
        active = tuple(sorted({s for s in row_slots if s is not None and self._slot_rank[s] > 0}))
        if self._routing.strategy != "packed" and active:
            return self._alternative_routing(row_slots, active)
        if len(active) == 1:
            row_mask = None
            if any(s != active[0] for s in row_slots):
                values = [1.0 if s == active[0] else 0.0 for s in row_slots]
                row_mask = torch.tensor(values, dtype=self.dtype).view(-1, 1, 1).to(self.device)
            return RowRouting(row_slots, active, row_mask, None, None)
        if not active:
            return RowRouting(row_slots, active, None, None, None)
        layout = self._packed_layout(active)
        starts = dict(zip(layout.slots, layout.offsets))
        ranks = dict(zip(layout.slots, layout.ranks))
        col_mask = torch.zeros(len(row_slots), layout.width, dtype=self.dtype)
        for row, slot in enumerate(row_slots):
            if slot in starts:
                col_mask[row, starts[slot] : starts[slot] + ranks[slot]] = 1.0
        return RowRouting(row_slots, active, None, layout, col_mask.unsqueeze(1).to(self.device))

    def _alternative_routing(self, row_slots: tuple[int | None, ...], active: tuple[int, ...]) -> RowRouting:
        """Routing for the "grouped" and "gathered" strategies (kept for measuring them against "packed")."""
        device = self.device
        rows_of_slot = {
            slot: torch.tensor([i for i, s in enumerate(row_slots) if s == slot], device=device) for slot in active
        }
        row_index = torch.tensor([s if s in rows_of_slot else 0 for s in row_slots], device=device)
        row_active = torch.tensor([float(s in rows_of_slot) for s in row_slots], dtype=self.dtype, device=device)
        row_mask = row_active.view(-1, 1, 1) if len(active) == 1 else None
        return RowRouting(row_slots, active, row_mask, None, None, rows_of_slot, row_index, row_active)

    def _packed_layout(self, active: tuple[int, ...]) -> PackedLayout:
        """Reuse the last layout while it covers the active slots unchanged and wastes at most half its width."""
        wanted = {(slot, self._versions[slot]) for slot in active}
        previous = self._layout
        if previous is not None and wanted <= set(previous.key):
            active_width = sum(self._slot_rank[s] for s in active)
            if 2 * active_width >= previous.width:
                return previous
        ranks = tuple(self._slot_rank[s] for s in active)
        offsets = tuple(sum(ranks[:i]) for i in range(len(ranks)))
        layout = PackedLayout(
            key=tuple(sorted(wanted)), slots=active, ranks=ranks, offsets=offsets, width=sum(ranks)
        )
        self._layout = layout
        return layout


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """A linear's weight in float32, dequantized when it is a bitsandbytes 4-bit layer."""
    weight = linear.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, quant_state).float()
    return weight.detach().float()


def dora_gain(weight: torch.Tensor, weights: LoraModuleWeights) -> torch.Tensor:
    """DoRA's per-output factor: magnitude / row norm of (W + scaling * B @ A), as peft computes it."""
    adapted = weight + weights.scaling * (weights.lora_B.to(weight) @ weights.lora_A.to(weight))
    return weights.magnitude.to(weight) / torch.linalg.norm(adapted, dim=1)


def target_linear_names(model: nn.Module) -> list[str]:
    """Names of every linear layer inside the decoder layers (the output head excluded)."""
    layer_ids = {id(module) for module in decoder_layers(model).modules()}
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) in layer_ids and not isinstance(module, SlottedLoraLinear)
    ]


def install_lora_slots(
    model: nn.Module, n_slots: int, max_rank: int, dtype: torch.dtype | None = None
) -> LoraSlotBank:
    """Wrap every decoder linear of `model` in a `SlottedLoraLinear` (in place) and return their bank.

    `dtype` is the dtype of the LoRA factors; by default the dtype of the model's embeddings.
    """
    if n_slots < 1 or max_rank < 1:
        raise ValueError("n_slots and max_rank must be at least 1")
    if dtype is None:
        dtype = model.get_input_embeddings().weight.dtype
    routing = _RoutingHolder()
    layers: dict[str, SlottedLoraLinear] = {}
    for name in target_linear_names(model):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapper = SlottedLoraLinear(getattr(parent, child_name), routing, n_slots, max_rank, dtype)
        setattr(parent, child_name, wrapper)
        layers[name] = wrapper
    if not layers:
        raise ValueError(f"{type(model).__name__} has no linear layers to serve LoRA on")
    return LoraSlotBank(layers, routing, n_slots, max_rank)
