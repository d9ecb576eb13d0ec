"""The base model with every adaptable module wrapped once, at start.

Linear / Conv1D projections inside the decoder layers become multi-adapter layers
(linear.py); decoder blocks get bottleneck insertion points (blocks.py). All
of them read the same `ContextHolder`, which the runner sets once per forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from loramux.adapters.kinds.lora_plan import HostIndices
from loramux.adapters.model.blocks import wrap_blocks
from loramux.adapters.model.linear import wrap_linears
from loramux.engine.forward_context import AdapterContext, ContextHolder

if TYPE_CHECKING:
    from loramux.adapters.kinds.lora import MergedWeight
    from loramux.adapters.kinds.soft_prompt import SoftPrompt


class WrappedModel:
    def __init__(self, model: PreTrainedModel, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be at least 1")
        self.model = model
        self.num_slots = num_slots
        self.holder = ContextHolder()
        p = next(model.parameters())
        self.device: torch.device = p.device
        self.dtype: torch.dtype = p.dtype
        # module name (as in model.named_modules()) -> wrapped layer
        self.linears = wrap_linears(model, self.holder, num_slots)
        # decoder layer index -> wrapped block
        self.blocks = wrap_blocks(model, self.holder, num_slots)
        # device slot -> its soft prompt (virtual tokens or KV prefix), which the runner places per request
        self.soft_prompts: dict[int, SoftPrompt] = {}

    def prepare_lora(self, ctx: AdapterContext) -> HostIndices:
        """Plan this forward's batched LoRA for every wrapped layer (once per stack layout); the
        plans' index lists, which the runner copies to the device with the forward's own."""
        host = HostIndices()
        if ctx.adapter_segments:
            for layer in self.linears.values():
                layer.prepare(ctx, host)
        return host

    def merged_weights(self, slot: int) -> list | None:
        """Every wrapped layer's weight for a forward whose rows all use `slot` merged (BASE_SLOT: W0
        everywhere), by layer `index`; None when some layer holds a delta of `slot` it has not merged."""
        weights = [layer.merged_or_base(slot) for layer in self.linears.values()]
        return None if any(w is None for w in weights) else weights

    def step_weights(self, ctx: AdapterContext) -> list[MergedWeight]:
        """Every wrapped layer's weight in the forward `ctx` describes (its merged copy or W0), by layer
        `index`: what a compiled adapter step multiplies by before each layer's delta operator."""
        return [layer.step_weight(ctx) for layer in self.linears.values()]

    def has_bottleneck(self) -> bool:
        """Whether any slot holds a bottleneck unit at any insertion point (compiled steps then take the
        adapter graph, adapters/model/adapter_op.py)."""
        return any(p.occupied for b in self.blocks.values() for p in b.points.values())

    def lora_stack_nbytes(self) -> int:
        """Bytes the wrapped layers' plain-LoRA stacks hold on the device, unused capacity included."""
        return sum(layer.stacked.nbytes() for layer in self.linears.values())
