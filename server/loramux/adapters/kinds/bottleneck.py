"""Bottleneck adapter insertion points (AdapterHub series, parallel and hybrid kinds).

Every decoder layer gets two insertion points, as in the `adapters` library: after
the attention sublayer ("attention", its `mh_adapter`) and after the feed-forward
sublayer ("output", its `output_adapter`). For Llama / Mistral / GPT-2 the library
calls its adapter layer with `layer_norm=None` (pre-LN blocks), so each point is a
function of the sublayer output `s` and the residual stream `x` entering that
sublayer's norm, and the library's output always has the form `x + d`:

    series:   h = s + x if original_ln_before else s
              r = s if residual_before_ln else h
              o = f(h) [+ r, then ln_after | ln_after, then + r]   (adapter_residual_before_ln)
    parallel: o = ln_after?(f(x)) + s
    output:   o + x if original_ln_after else o

with f(h) = scaling · W_up·act(W_down·ln_before?(h) + b_down) + b_up. The decoder
layer itself adds `x + sublayer_output`, so the sublayer's output for a bottleneck
row is replaced by d = o (or o - x without original_ln_after); float addition
commutes, so `x + o` is bit-for-bit the library's `o + x`.

Why hooks rather than wrapper modules: a forward hook on the sublayer and a
forward pre-hook on its norm (to see `x`), registered once at start, leave every
module path and the state dict unchanged, so LoRA name matching, merged weights
and the Linear wrappers are unaffected. Nothing is hooked per call. Rows whose
slot holds no bottleneck adapter at a point are untouched; when no slot holds one
the hooks return at once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import get_activation

from loramux.adapters.adapter import AdapterError
from loramux.adapters.context import ContextHolder

POINTS = ("attention", "output")  # the library's mh_adapter and output_adapter locations

# model_type -> (path to the decoder layers, {point: (norm before the sublayer, sublayer)})
ARCHITECTURES: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "llama": (
        "model.layers",
        {"attention": ("input_layernorm", "self_attn"), "output": ("post_attention_layernorm", "mlp")},
    ),
    "mistral": (
        "model.layers",
        {"attention": ("input_layernorm", "self_attn"), "output": ("post_attention_layernorm", "mlp")},
    ),
    "gpt2": ("transformer.h", {"attention": ("ln_1", "attn"), "output": ("ln_2", "mlp")}),
}


def activation(name: str) -> nn.Module:
    """The library's non-linearity for `name` (its Activation_Function_Class), parameter-free only."""
    key = name.lower()
    if key == "leakyrelu":  # the library special-cases this spelling to F.leaky_relu
        return nn.LeakyReLU()
    try:
        act = get_activation(key)
    except KeyError:
        raise AdapterError(f"non_linearity {name!r} is not a known activation") from None
    if any(True for _ in act.parameters()):
        raise AdapterError(f"non_linearity {name!r} has trained parameters; not supported")
    return act


@dataclass
class BottleneckUnit:
    """One adapter at one insertion point of one layer: weights plus the placement flags."""

    down_w: torch.Tensor  # [bottleneck, hidden]
    down_b: torch.Tensor  # [bottleneck]
    up_w: torch.Tensor  # [hidden, bottleneck]
    up_b: torch.Tensor  # [hidden]
    act: nn.Module
    scaling: float | torch.Tensor  # float, or [1] ("learned") / [hidden] ("channel")
    ln_before: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight, bias), each [hidden]
    ln_after: tuple[torch.Tensor, torch.Tensor] | None = None
    is_parallel: bool = False
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool = True
    adapter_residual_before_ln: bool = False
    ln_eps: float = 1e-5  # nn.LayerNorm's default, which the library uses

    @property
    def size(self) -> int:
        return int(self.down_w.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        out = [self.down_w, self.down_b, self.up_w, self.up_b]
        out += [t for ln in (self.ln_before, self.ln_after) if ln is not None for t in ln]
        return out + ([self.scaling] if isinstance(self.scaling, torch.Tensor) else [])

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> BottleneckUnit:
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype or t.dtype)

        changes = {f.name: mv(getattr(self, f.name)) for f in fields(self) if f.name.endswith(("_w", "_b"))}
        changes["ln_before"] = tuple(map(mv, self.ln_before)) if self.ln_before else None
        changes["ln_after"] = tuple(map(mv, self.ln_after)) if self.ln_after else None
        changes["scaling"] = mv(self.scaling) if isinstance(self.scaling, torch.Tensor) else self.scaling
        return replace(self, **changes)

    def _ln(self, h: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(h, h.shape[-1:], wb[0], wb[1], self.ln_eps)

    def _f(self, h: torch.Tensor) -> torch.Tensor:
        # h: [rows, hidden] -> [rows, hidden]; the library's adapter_down, adapter_up, then * scaling
        if self.ln_before is not None:
            h = self._ln(h, self.ln_before)
        down = self.act(F.linear(h, self.down_w, self.down_b))  # [rows, bottleneck]
        return F.linear(down, self.up_w, self.up_b) * self.scaling

    def delta(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """d with x + d = the library's output; s: sublayer output, x: residual, both [rows, hidden]."""
        if self.is_parallel:
            # ParallelAdapter: pre_forward feeds the block input; forward has no residual; post_forward adds s.
            o = self._f(x)
            if self.ln_after is not None:
                o = self._ln(o, self.ln_after)
            o = o + s
        else:
            h = s + x if self.original_ln_before else s
            r = s if self.residual_before_ln else h
            o = self._f(h)
            if self.adapter_residual_before_ln:
                o = o + r
            if self.ln_after is not None:
                o = self._ln(o, self.ln_after)
            if not self.adapter_residual_before_ln:
                o = o + r
        # Without original_ln_after the library drops the block residual; the layer will add it back.
        return o if self.original_ln_after else o - x


class InsertionPoint:
    """The per-slot units at one point of one layer, and the rows they apply to."""

    def __init__(self, holder: ContextHolder, num_slots: int) -> None:
        self.holder = holder
        self.units: list[BottleneckUnit | None] = [None] * num_slots
        self.occupied: set[int] = set()
        self._x: torch.Tensor | None = None  # the residual entering the norm, kept only for one forward

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
        # Only hold x when this forward needs it: it is [1, tokens, hidden] per layer.
        self._x = args[0] if self.occupied and self._active() else None

    def sublayer_hook(self, module: nn.Module, args: tuple, output: object) -> object:
        x, self._x = self._x, None
        active = self._active()
        if not active:
            return None
        if x is None:
            raise RuntimeError("bottleneck point: the sublayer ran without its norm (unexpected layer structure)")
        s = output[0] if isinstance(output, tuple) else output  # s: [1, tokens, hidden]
        if s.shape[0] != 1 or s.shape != x.shape:
            raise RuntimeError(f"bottleneck point expects flat rows [1, tokens, hidden]; got {tuple(s.shape)}")
        out = s.clone()
        for start, end, unit in active:
            out[0, start:end] = unit.delta(s[0, start:end], x[0, start:end])
        return (out, *output[1:]) if isinstance(output, tuple) else out


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


def decoder_layers(model: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """(path prefix of the layers, the layers) for a supported architecture, else None."""
    arch = ARCHITECTURES.get(getattr(getattr(model, "config", None), "model_type", ""))
    if arch is None:
        return None
    obj: object = model
    for attr in arch[0].split("."):
        obj = getattr(obj, attr, None)
    return (arch[0], list(obj)) if isinstance(obj, nn.ModuleList) else None


def wrap_blocks(model: nn.Module, holder: ContextHolder, num_slots: int) -> dict[int, nn.Module]:
    """Insertion points on every decoder layer; {} for a base model without bottleneck support."""
    found = decoder_layers(model)
    if found is None:
        return {}
    parts = ARCHITECTURES[model.config.model_type][1]
    return {i: BottleneckBlock(layer, parts, holder, num_slots) for i, layer in enumerate(found[1])}
