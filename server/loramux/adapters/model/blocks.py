"""Bottleneck insertion points on the decoder layers: where kinds/bottleneck.py's units are applied.

Every decoder layer of a supported architecture gets two insertion points (the
`adapters` library's `mh_adapter` and `output_adapter` locations): after the
attention sublayer and after the feed-forward sublayer; see kinds/bottleneck.py
for what a unit computes there.

Why hooks rather than wrapper modules: a forward hook on the sublayer and a
forward pre-hook on its norm (to see `x`), registered once at start, leave every
module path and the state dict unchanged, so LoRA name matching, merged weights
and the Linear wrappers are unaffected. Nothing is hooked per call. Rows whose
slot holds no bottleneck adapter at a point are untouched; when no slot holds one
the hooks return at once.
"""

from __future__ import annotations

import torch
from torch import nn

from loramux.adapters.kinds.bottleneck import BottleneckUnit
from loramux.adapters.model.adapter_op import LayerHandle, bottleneck_point
from loramux.adapters.model.decoder_layers import find_decoder_layers
from loramux.engine.forward_context import ContextHolder

# model_type -> {point: (norm before the sublayer, sublayer)}, inside each decoder layer
SUBLAYERS: dict[str, dict[str, tuple[str, str]]] = {
    "llama": {"attention": ("input_layernorm", "self_attn"), "output": ("post_attention_layernorm", "mlp")},
    "mistral": {"attention": ("input_layernorm", "self_attn"), "output": ("post_attention_layernorm", "mlp")},
    "gpt2": {"attention": ("ln_1", "attn"), "output": ("ln_2", "mlp")},
}


class InsertionPoint:
    """The per-slot units at one point of one layer, and the rows they apply to."""

    def __init__(self, holder: ContextHolder, num_slots: int) -> None:
        self.holder = holder
        self.units: list[BottleneckUnit | None] = [None] * num_slots
        self.occupied: set[int] = set()
        self._x: torch.Tensor | None = None  # the residual entering the norm, kept only for one forward
        self.handle = LayerHandle(self)  # what the opaque operator of compiled adapter steps is given

    def set(self, slot: int, unit: BottleneckUnit | None) -> None:
        if not 0 <= slot < len(self.units):
            raise ValueError(f"slot {slot} out of range 0..{len(self.units) - 1}")
        self.units[slot] = unit
        (self.occupied.add if unit is not None else self.occupied.discard)(slot)

    def _active(self) -> list[tuple[int, int, BottleneckUnit]]:
        if not self.occupied:
            return []
        ctx = self.holder.get()
        if ctx is None:
            return []
        return [(s.start, s.end, self.units[s.slot]) for s in ctx.adapter_segments if s.slot in self.occupied]

    def norm_pre_hook(self, module: nn.Module, args: tuple) -> None:
        ctx = self.holder.get()
        if ctx is not None and ctx.opaque_adapters:  # a compiled adapter step: the sublayer's hook needs x
            self._x = args[0]
            return
        # Only hold x when this forward needs it: it is [1, tokens, hidden] per layer.
        self._x = args[0] if self.occupied and self._active() else None

    def sublayer_hook(self, module: nn.Module, args: tuple, output: object) -> object:
        x, self._x = self._x, None
        ctx = self.holder.get()
        # a compiled adapter step: the units are applied inside one opaque call (adapter_op.py), which
        # reads the segments itself; eager: the active units now, or nothing to do
        opaque = ctx is not None and ctx.opaque_adapters
        active = [] if opaque else self._active()
        if not opaque and not active:
            return None
        if x is None:
            raise RuntimeError("bottleneck point: the sublayer ran without its norm (unexpected layer structure)")
        s = output[0] if isinstance(output, tuple) else output  # s: [1, tokens, hidden]
        if s.shape[0] != 1 or s.shape != x.shape:
            raise RuntimeError(f"bottleneck point expects flat rows [1, tokens, hidden]; got {tuple(s.shape)}")
        if opaque:
            out = bottleneck_point(s[0], x[0], self.handle)[None]
        else:
            out = self._apply(s[0], x[0], active)[None]
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def eager_apply(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What `loramux::bottleneck_point` computes: `_apply` with the units active in this forward."""
        return self._apply(s, x, self._active())

    @staticmethod
    def _apply(s: torch.Tensor, x: torch.Tensor, active: list[tuple[int, int, BottleneckUnit]]) -> torch.Tensor:
        """s [tokens, hidden] with each active unit's delta on its rows (x [tokens, hidden]: the
        residual), as a new tensor."""
        out = s.clone()
        for start, end, unit in active:
            out[start:end] = unit.delta(s[start:end], x[start:end])
        return out


class BottleneckBlock(nn.Module):
    """The insertion points of one decoder layer. Holds no parameters: adapter tensors live in the units."""

    def __init__(self, layer: nn.Module, parts: dict[str, tuple[str, str]], holder: ContextHolder, num_slots: int):
        super().__init__()
        self.points: dict[str, InsertionPoint] = {}
        for point, (norm_name, sub_name) in parts.items():
            norm, sub = getattr(layer, norm_name, None), getattr(layer, sub_name, None)
            if norm is None or sub is None:
                raise ValueError(f"decoder layer {type(layer).__name__} has no {norm_name} / {sub_name}")
            p = InsertionPoint(holder, num_slots)
            norm.register_forward_pre_hook(p.norm_pre_hook)
            sub.register_forward_hook(p.sublayer_hook)
            self.points[point] = p
        self.sublayer_names = {point: sub for point, (_, sub) in parts.items()}

    def set(self, point: str, slot: int, unit: BottleneckUnit | None) -> None:
        self.points[point].set(slot, unit)

    def clear(self, slot: int) -> None:
        for p in self.points.values():
            p.set(slot, None)


def wrap_blocks(model: nn.Module, holder: ContextHolder, num_slots: int) -> dict[int, nn.Module]:
    """Insertion points on every decoder layer; {} for a base model without bottleneck support."""
    parts = SUBLAYERS.get(getattr(getattr(model, "config", None), "model_type", ""))
    if parts is None:
        return {}
    _, layers = find_decoder_layers(model)
    return {i: BottleneckBlock(layer, parts, holder, num_slots) for i, layer in enumerate(layers)}
