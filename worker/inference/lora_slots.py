"""Batched multi-LoRA linears with preallocated adapter slots, in the manner of Punica and S-LoRA.

Each target linear keeps `lora_A: [n_slots, max_rank, in]`, `lora_B: [n_slots, out, max_rank]` and a
scaling per slot. Before a forward pass the caller routes every batch row to a slot (or to none);
the wrapper then adds each row's own LoRA delta to the shared base output. Loading an adapter only
copies its tensors into a free slot (ranks below `max_rank` are zero-padded). The bank that loads slots and
routes rows is `worker.inference.lora_bank`; this module holds the wrapped linear and its installation.

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

import torch
from torch import nn

from worker.formats.ia3 import Ia3Gain
from worker.formats.lora import LoraModuleWeights
from worker.formats.sparse_deltas import DenseDelta
from worker.inference.lora_bank import LoraSlotBank, PackedLayout, RoutingHolder, RowRouting
from worker.model_parts import decoder_layers


class SlottedLoraLinear(nn.Module):
    """A base linear (`nn.Linear` or bitsandbytes `Linear4bit`) plus LoRA slots; each batch row picks its slot."""

    def __init__(
        self, base_layer: nn.Linear, routing: RoutingHolder, n_slots: int, max_rank: int, dtype: torch.dtype
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
        self._single_factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

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
        self._single_factors.pop(slot, None)
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
            factors = self._single_slot_factors(routing.active_slots[0])
            if factors is not None:
                out = self._accumulate(out, x, *factors, routing.row_mask)
        elif strategy == "packed":
            out = self._accumulate(out, x, *self._packed_factors(routing.layout), routing.col_mask)
        elif strategy == "grouped":
            out = self._add_grouped(out, x, routing)
        else:
            out = out + self._gathered_delta(x, routing).to(out.dtype)
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

    def _single_slot_factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The slot's A and its scaled B, transposed and contiguous, cached until the slot is written."""
        factors = self._single_factors.get(slot)
        if factors is None and self.slot_ranks[slot]:
            rank = self.slot_ranks[slot]
            scaled_b = self.lora_B[slot, :, :rank] * self.slot_scaling[slot]
            factors = (self.lora_A[slot, :rank], scaled_b.t().contiguous())
            self._single_factors[slot] = factors
        return factors

    @staticmethod
    def _accumulate(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
        """out + ((x a^T) * mask) b_t, the second product accumulated into out by one `addmm` (same dtypes)."""
        hidden = nn.functional.linear(x, a)
        if mask is not None:
            hidden = hidden.mul_(mask)
        if out.dtype != hidden.dtype:  # e.g. a 4-bit base computing in another dtype than the factors
            return out + (hidden @ b_t).to(out.dtype)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), b_t)
        return flat.view(out.shape)

    def _packed_factors(self, layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """The active slots' A rows side by side, and their scaled B columns transposed; cached per layout."""
        if self._packed_key != layout.key:
            a_parts, b_parts = [], []
            for slot, rank in zip(layout.slots, layout.ranks):
                a_parts.append(self.lora_A[slot, :rank])
                b_parts.append(self.lora_B[slot, :, :rank] * self.slot_scaling[slot])
            self._packed = (torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1).t().contiguous())
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
    routing = RoutingHolder()
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
