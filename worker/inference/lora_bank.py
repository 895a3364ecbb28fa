"""The slot bank: which adapter slot each batch row uses, and loading adapters into every slotted linear.

`LoraSlotBank.route` builds one `RowRouting` per batch composition (masks, packed layouts, row groups) and
sets it, per thread, for every `SlottedLoraLinear` of the model (worker.inference.lora_slots) to read.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from worker.formats.ia3 import Ia3Gain
from worker.formats.lora import LoraAdapter, LoraModuleWeights, read_lora_adapter
from worker.formats.sparse_deltas import DenseDelta

if TYPE_CHECKING:
    from worker.inference.lora_slots import SlottedLoraLinear

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


class RoutingHolder:
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


class LoraSlotBank:
    """Every slotted linear of one model: load adapters into slots and route batch rows to them."""

    def __init__(self, layers: dict[str, SlottedLoraLinear], routing: RoutingHolder, n_slots: int, max_rank: int):
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
