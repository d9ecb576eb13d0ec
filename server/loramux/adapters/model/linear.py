"""Multi-adapter linear layers: every decoder-layer projection, wrapped once at start.

A `MultiAdapterLinear` keeps the frozen base module (`nn.Linear` or GPT-2's
`Conv1D`) and, per device slot, the weights of whatever adapter is installed
there. Its forward runs the base module once for all rows, then adds each
segment's adapter delta on that segment's contiguous rows (kinds/lora.py), or, for
plain LoRA slots, all segments at once (kinds/lora_batched.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramux.adapters.kinds.lora import MergedWeight, SlotDelta, fold, segment_unmerge
from loramux.adapters.kinds.lora_batched import apply_segments
from loramux.adapters.kinds.lora_batched import prepare as prepare_lora
from loramux.adapters.kinds.lora_plan import HostIndices
from loramux.adapters.kinds.lora_stacks import LoraStacks
from loramux.adapters.kinds.peft_adapter import ModuleWeights
from loramux.adapters.model.adapter_op import LayerHandle, adapter_delta
from loramux.adapters.model.decoder_layers import find_decoder_layers
from loramux.engine.forward_context import BASE_SLOT, AdapterContext, ContextHolder


class MultiAdapterLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, holder: ContextHolder, num_slots: int) -> None:
        super().__init__()
        if isinstance(base_layer, Conv1D):
            # Conv1D computes x·W + b with W: [in, out]
            in_f, out_f = base_layer.weight.shape
            self.is_conv1d = True
        elif isinstance(base_layer, nn.Linear):
            out_f, in_f = base_layer.weight.shape
            self.is_conv1d = False
        else:
            raise ValueError(f"cannot wrap {type(base_layer).__name__}; only nn.Linear and Conv1D")
        self.base_layer = base_layer
        self.holder = holder
        self.index = 0  # position among the model's wrapped layers (wrap_linears), in AdapterContext.merged_weights
        self.in_features = int(in_f)
        self.out_features = int(out_f)
        self.num_slots = num_slots
        self._parts: list[ModuleWeights | None] = [None] * num_slots
        # slot -> compiled delta; what forward reads
        self.deltas: list[SlotDelta | None] = [None] * num_slots
        # plain-LoRA slots' A / B stacked by rank bucket for batched LoRA; their deltas' a_t / b_t are views into it
        self.stacked = LoraStacks(self.in_features, self.out_features)
        # slot -> merged copy of W0 + delta (cache/merged.py); used when ctx.merged_slot is that slot
        self.merged: dict[int, MergedWeight] = {}
        # what the opaque adapter operator is given in a compiled adapter step (adapter_op.py)
        self.handle = LayerHandle(self)
        # whether any slot holds something here: a layer no adapter targets is W0 alone, with no per-row work
        self.holding = False
        # W0 as a MergedWeight (views of the base module's parameters), built once by `merged_or_base`
        self._w0: MergedWeight | None = None

    # The base module's parameters, for code that reads `proj.weight` / `proj.bias`.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_weight_rows(self) -> torch.Tensor:
        """W0 as [out, in] (a view), whatever the base module's layout."""
        w = self.base_layer.weight
        return w.t() if self.is_conv1d else w

    def base_weight_cols(self) -> torch.Tensor:
        """W0 as [in, out] (a view), so that y = x · W0_cols."""
        w = self.base_layer.weight
        return w if self.is_conv1d else w.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] (the runner's [1, tokens, in]); y: [..., out], base bias included
        ctx = self.holder.get()
        if ctx is not None and ctx.merged_weights is not None:
            # a compiled step (engine/compiled.py): this layer's weight (W0 or a merged copy) from the
            # context by layer index, so the product is traced whatever is merged where
            w = ctx.merged_weights[self.index]
            x2 = x.reshape(-1, self.in_features)  # [tokens, in]
            y = F.linear(x2, w.weight, w.bias)  # [tokens, out]
            if ctx.opaque_adapters:  # the adapter graph: every row's delta in one opaque call (adapter_op.py)
                adapter_delta(x2, y, self.handle)
            return y.view(*x.shape[:-1], self.out_features)
        return self.eager_forward(x, ctx)

    def eager_forward(self, x: torch.Tensor, ctx: AdapterContext | None) -> torch.Tensor:
        """The layer's output for every row of the forward `ctx` describes: W0 (or a merged copy) and
        each row's adapter delta. x: [..., in]; returns [..., out], base bias included."""
        if self._w0_alone(ctx):
            return self._base_out(x)
        merged = self._merged_for(ctx)
        y = self._base_out(x) if merged is None else F.linear(x, merged.weight, merged.bias)  # [..., out]
        self.add_deltas(x.reshape(-1, self.in_features), y.view(-1, self.out_features), ctx, merged)
        return y

    def _w0_alone(self, ctx: AdapterContext | None) -> bool:
        """Whether every row of the forward gets W0's output and nothing more: a forward of base rows
        only (tested first: the compiled base graph traces this and must not guard on what the slots
        hold), or a layer no slot holds anything in (gate_proj of a q, v LoRA, ...)."""
        return ctx is None or (not ctx.adapter_segments and ctx.merged_slot == BASE_SLOT) or not self.holding

    def step_weight(self, ctx: AdapterContext) -> MergedWeight:
        """The weight this layer multiplies every row of `ctx`'s forward by: the merged copy that
        replaces W0 (see `_merged_for`), else W0; `delta_into` adds what each row needs on top."""
        merged = self._merged_for(ctx)
        return merged if merged is not None else self.merged_or_base(BASE_SLOT)  # type: ignore[return-value]

    def delta_into(self, x2: torch.Tensor, y2: torch.Tensor, ctx: AdapterContext | None) -> None:
        """The adapter operator's body (adapter_op.py): add each row's delta into y2 = x2 · W in place,
        W being `step_weight(ctx)`. x2: [tokens, in]; y2: [tokens, out]."""
        if not self._w0_alone(ctx):
            self.add_deltas(x2, y2, ctx, self._merged_for(ctx))  # type: ignore[arg-type]

    def add_deltas(self, x2: torch.Tensor, y2: torch.Tensor, ctx: AdapterContext, merged: MergedWeight | None) -> None:
        """Add each row's adapter delta into y2 = x2 · W [tokens, out] in place, W being `merged`'s
        weight (then the other rows undo its delta and add their own, dLoRA) or W0 (None).
        x2: [tokens, in]."""
        if y2.shape[0] != ctx.num_tokens:
            raise ValueError(f"adapter context has {ctx.num_tokens} rows but the layer got {y2.shape[0]} tokens")
        if merged is None:
            if ctx.adapter_segments:
                apply_segments(y2, x2, ctx, ctx.adapter_segments, self.deltas, self.stacked, "all")
        elif ctx.other_spans:
            segment_unmerge(y2, x2, ctx.other_spans, self.deltas[ctx.merged_slot])
            apply_segments(y2, x2, ctx, ctx.other_adapter_segments, self.deltas, self.stacked, "others")

    def _base_out(self, x: torch.Tensor) -> torch.Tensor:
        """x·W0ᵀ + b [..., out]: F.linear directly for nn.Linear (once per layer per forward; the
        module call costs ~5 µs more)."""
        base = self.base_layer
        return base(x) if self.is_conv1d else F.linear(x, base.weight, base.bias)

    def prepare(self, ctx: AdapterContext, host: HostIndices) -> None:
        """Before the forward: plan the batched LoRA this layer's forward will run (the runner puts
        the plans' indices into its one copy); layers of one stack layout share one plan."""
        if not self.holding:
            return
        if self._merged_for(ctx) is not None:
            which = "others" if ctx.other_spans else None
        else:
            which = "all" if ctx.adapter_segments else None
        if which is not None:
            prepare_lora(ctx, self.stacked, which, self.base_layer.weight.device, host)

    def _merged_for(self, ctx: AdapterContext | None) -> MergedWeight | None:
        """The merged weight this forward replaces W0 with, if any."""
        if ctx is None or ctx.merged_slot == BASE_SLOT:
            return None
        merged = self.merged.get(ctx.merged_slot)
        # Other rows can undo only a plain LoRA merge; otherwise (DoRA / IA3 here) this layer
        # computes base + per-row delta, which is exact for every slot, merged or not.
        if merged is not None and (not ctx.other_spans or self._subtractable(ctx.merged_slot)):
            return merged
        return None

    def _subtractable(self, slot: int) -> bool:
        d = self.deltas[slot]
        return d is not None and d.in_scale is None and d.out_scale is None

    # ---- installing ------------------------------------------------------------

    def set_lora(
        self,
        slot: int,
        a: torch.Tensor,
        b: torch.Tensor,
        lora_bias: torch.Tensor | None = None,
        dora_g: torch.Tensor | None = None,
    ) -> None:
        """LoRA (or DoRA with `dora_g`) in `slot`. a: [r, in]; b: [out, r] and lora_bias: [out], both already × s."""
        r = a.shape[0]
        self._check(a, (r, self.in_features), "lora A")
        self._check(b, (self.out_features, r), "lora B")
        if lora_bias is not None:
            self._check(lora_bias, (self.out_features,), "lora bias")
        if dora_g is not None:
            self._check(dora_g, (self.out_features,), "DoRA scale")
        parts = self._parts_of(slot)
        parts.a, parts.b, parts.lora_bias, parts.dora_g = a, b, lora_bias, dora_g
        self._compile(slot)

    def set_ia3(self, slot: int, vec: torch.Tensor, feedforward: bool) -> None:
        """IA3 in `slot`: vec [in] scales the input (feed-forward modules), else vec [out] scales the output."""
        self._check(vec, (self.in_features if feedforward else self.out_features,), "IA3 vector")
        parts = self._parts_of(slot)
        parts.ia3, parts.ia3_feedforward = vec, feedforward
        self._compile(slot)

    def set_bias_delta(self, slot: int, delta: torch.Tensor) -> None:
        """Replace the base bias in `slot`: delta [out] = b_new - b_old (PEFT bias="all" / "lora_only")."""
        self._check(delta, (self.out_features,), "bias delta")
        self._parts_of(slot).bias_delta = delta
        self._compile(slot)

    def clear(self, slot: int) -> None:
        self._slot_index(slot)
        self._parts[slot] = None
        self.deltas[slot] = None
        self._unstack(slot)
        self.merged.pop(slot, None)
        self._update_holding()

    def parts(self, slot: int) -> ModuleWeights | None:
        """What is installed in `slot` (read-only; cache/merged_weights.py merges from it)."""
        return self._parts[self._slot_index(slot)]

    def set_merged(self, slot: int, merged: MergedWeight) -> None:
        """Use `merged` instead of W0 (and `slot`'s delta) when a forward's merged slot is `slot`."""
        if self.deltas[self._slot_index(slot)] is None:
            raise ValueError(f"slot {slot} holds nothing in this layer; there is nothing to merge")
        self._check(merged.weight, (self.out_features, self.in_features), "merged weight")
        if merged.bias is not None:
            self._check(merged.bias, (self.out_features,), "merged bias")
        self.merged[slot] = merged

    def merged_or_base(self, slot: int) -> MergedWeight | None:
        """The weight that stands for W0 + `slot`'s delta here: its merged copy, W0 where `slot` holds
        nothing in this layer (BASE_SLOT: always W0), None where a delta is installed but not merged."""
        if slot != BASE_SLOT:
            if slot in self.merged:
                return self.merged[slot]
            if self.deltas[self._slot_index(slot)] is not None:
                return None
        if self._w0 is None:  # plain tensors (views), as merged copies are: a graph's guards see one kind of input
            bias = self.bias.detach() if self.bias is not None else None
            self._w0 = MergedWeight(self.base_weight_rows().detach(), bias, 0)
        return self._w0

    def clear_merged(self, slot: int) -> None:
        self.merged.pop(self._slot_index(slot), None)

    def slot_nbytes(self, slot: int) -> int:
        """What `slot` holds in this layer: its own tensors, or for a plain LoRA slot its rank bucket's share."""
        d = self.deltas[self._slot_index(slot)]
        if d is None:
            return 0
        if slot in self.stacked.where:
            return self.stacked.slot_nbytes(slot)  # plain: no in / out scales, its shift is in the stacks
        return d.nbytes()

    def resident_nbytes(self) -> int:
        """Bytes of adapter weights this layer really holds: the stacks as allocated, plus unstacked deltas."""
        own = sum(d.nbytes() for s, d in enumerate(self.deltas) if d is not None and s not in self.stacked.where)
        return own + self.stacked.nbytes()

    def _slot_index(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")
        return slot

    def _parts_of(self, slot: int) -> ModuleWeights:
        if self._parts[self._slot_index(slot)] is None:
            self._parts[slot] = ModuleWeights()
        return self._parts[slot]  # type: ignore[return-value]

    def _check(self, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
        w = self.base_layer.weight
        if tuple(t.shape) != shape:
            raise ValueError(f"{what} has shape {tuple(t.shape)}, the layer needs {shape}")
        if t.device != w.device or t.dtype != w.dtype:
            raise ValueError(f"{what} is {t.dtype} on {t.device}, the layer is {w.dtype} on {w.device}")

    def _compile(self, slot: int) -> None:
        """Fold one slot's parts into the `SlotDelta` that forward applies (see kinds/lora.py)."""
        p = self._parts[slot]
        if p is None:
            self.deltas[slot] = None
            self._unstack(slot)
            self._update_holding()
            return
        d = fold(p, self.base_layer.bias, self.base_weight_cols())
        self.deltas[slot] = d
        self._update_holding()
        if d is not None and d.a_t is not None and d.b_t is not None and d.in_scale is None and d.out_scale is None:
            self.stacked.put(slot, d.a_t, d.b_t, d.out_shift)
            self._repoint()
        else:
            self._unstack(slot)

    def _update_holding(self) -> None:
        self.holding = any(d is not None for d in self.deltas) or bool(self.merged)

    def _unstack(self, slot: int) -> None:
        if slot in self.stacked.where:
            self.stacked.drop(slot)
            self._repoint()

    def _repoint(self) -> None:
        # hold the weights once: every plain slot reads views of the stacks, re-pointed after each
        # put / drop (members move within their bucket, buckets grow and shrink)
        for s in self.stacked.where:
            ds = self.deltas[s]
            if ds is not None:
                ds.a_t, ds.b_t = self.stacked.views(s)

    def extra_repr(self) -> str:
        used = sum(d is not None for d in self.deltas)
        kind = "Conv1D" if self.is_conv1d else "Linear"
        return f"{kind} in={self.in_features} out={self.out_features} slots={self.num_slots} used={used}"


def wrap_linears(model: nn.Module, holder: ContextHolder, num_slots: int) -> dict[str, MultiAdapterLinear]:
    """Replace every nn.Linear / Conv1D inside the decoder layers; keys are the original module names."""
    prefix, layers = find_decoder_layers(model)
    targets = [
        (f"{prefix}.{name}", name, module)
        for name, module in layers.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and name
    ]
    wrapped: dict[str, MultiAdapterLinear] = {}
    for full_name, rel_name, module in targets:
        parent_name, _, child = rel_name.rpartition(".")
        parent = layers.get_submodule(parent_name) if parent_name else layers
        layer = MultiAdapterLinear(module, holder, num_slots)
        layer.index = len(wrapped)
        setattr(parent, child, layer)
        wrapped[full_name] = layer
    return wrapped
