"""Bottleneck adapters per batch row: forward hooks on every decoder layer's `self_attn` and `mlp`.

Each hook reads the current routing (shared with the slotted linears) and, for each routed slot that
has a block after this module, adds scaling * up(act(down(h))) to that slot's rows only
(index_select/index_add), so bottleneck rows share a batch with rows of any other adapter.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional

from worker.formats.bottleneck import BottleneckAdapter, BottleneckBlock, activation_module
from worker.inference.lora_bank import LoraSlotBank
from worker.model_parts import decoder_layers

_MODULES = {"attention": "self_attn", "mlp": "mlp"}


class BottleneckSlots:
    """The bottleneck blocks of every slot, applied by hooks installed once on the model."""

    def __init__(self, model: nn.Module, bank: LoraSlotBank) -> None:
        self._bank = bank
        self._device, self._dtype = bank.device, bank.dtype
        self._adapters: dict[int, BottleneckAdapter] = {}
        self._activations: dict[int, nn.Module] = {}
        layers = decoder_layers(model)
        self.num_layers = len(layers)
        self.supported = all(hasattr(layer, module) for layer in layers for module in _MODULES.values())
        if self.supported:
            for index, layer in enumerate(layers):
                for placement, module in _MODULES.items():
                    getattr(layer, module).register_forward_hook(self._hook(index, placement))

    def write_slot(self, slot: int, adapter: BottleneckAdapter | None) -> None:
        """Set (or clear, with None) the slot's blocks; the slot must not be routed to meanwhile."""
        if adapter is None:
            self._adapters.pop(slot, None)
            self._activations.pop(slot, None)
            return
        blocks = {
            key: BottleneckBlock(*(t.to(self._device, self._dtype) for t in (b.down_weight, b.down_bias,
                                                                             b.up_weight, b.up_bias)))
            for key, b in adapter.blocks.items()
        }
        self._activations[slot] = activation_module(adapter.activation)
        self._adapters[slot] = BottleneckAdapter(blocks, adapter.activation, adapter.scaling)

    def _hook(self, layer: int, placement: str):
        key = (layer, placement)

        def add_blocks(module, args, output):
            routing = self._bank.current_routing
            if routing is None or not routing.extra_slots:
                return None
            applied = [(slot, self._adapters[slot]) for slot in routing.extra_slots
                       if slot in self._adapters and key in self._adapters[slot].blocks]
            if not applied:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            for slot, adapter in applied:
                rows = routing.rows_of[slot]
                block = adapter.blocks[key]
                inputs = hidden if rows is None else hidden.index_select(0, rows)
                inner = self._activations[slot](functional.linear(inputs, block.down_weight, block.down_bias))
                delta = functional.linear(inner, block.up_weight, block.up_bias) * adapter.scaling
                hidden = hidden + delta if rows is None else hidden.index_add(0, rows, delta)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return add_blocks
