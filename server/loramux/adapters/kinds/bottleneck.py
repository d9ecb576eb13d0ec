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

The insertion points that apply these units live in model/blocks.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import get_activation

from loramux.adapters.kinds.base import AdapterError, AdapterInfo, LoadedAdapter

if TYPE_CHECKING:
    from loramux.adapters.model.wrapped import WrappedModel

POINTS = ("attention", "output")  # the library's mh_adapter and output_adapter locations


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


class BottleneckAdapter(LoadedAdapter):
    """Validated units keyed by (decoder layer index, insertion point)."""

    def __init__(self, info: AdapterInfo, units: dict[tuple[int, str], BottleneckUnit]) -> None:
        self.info = info
        self.units = units

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for u in self.units.values() for t in u.tensors())

    def to_device(self, device: torch.device) -> BottleneckAdapter:
        if all(t.device == device for u in self.units.values() for t in u.tensors()):
            return self
        return BottleneckAdapter(self.info, {k: u.to(device) for k, u in self.units.items()})

    def install(self, wrapped: WrappedModel, slot: int) -> None:
        for (layer, point), unit in self.units.items():
            wrapped.blocks[layer].set(point, slot, unit)

    def uninstall(self, wrapped: WrappedModel, slot: int) -> None:
        for layer, point in self.units:
            wrapped.blocks[layer].set(point, slot, None)
