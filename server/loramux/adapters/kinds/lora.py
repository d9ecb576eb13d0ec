"""The per-segment adapter arithmetic: the one kernel interface wrapped linears call.

Every adapter kind that lives inside a linear layer (LoRA, DoRA, IA3, base-bias
replacement) compiles, per slot and per layer, to one `SlotDelta`. Applied to a
segment's rows of the base output `y = x·W0ᵀ + b`, in this order:

    y += (x ⊙ in_scale) · W0ᵀ      IA3 on a feed-forward module (in_scale = l - 1)
    y *= out_scale                 IA3 output scaling, or the DoRA row scale g
    y += out_shift                 LoRA bias, base-bias delta, DoRA's (1 - g)·b
    y += (x · Aᵀ) · Bᵀ             LoRA / DoRA (s and g already folded into B)

`segment_lora` is pure torch with in-place ops on row slices (two matmuls per
LoRA segment): the reference path. For plain LoRA slots (no in_scale / out_scale)
lora_batched.py runs all segments of a forward as one gathered bmm pair instead,
chosen per layer and per forward; a fused CUDA kernel can replace either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from loramux.adapters.kinds.peft_adapter import ModuleWeights
from loramux.engine.forward_context import Segment


@dataclass
class SlotDelta:
    """One slot's compiled computation in one layer. Every field is optional."""

    a_t: torch.Tensor | None = None  # [in, r]: Aᵀ
    b_t: torch.Tensor | None = None  # [r, out]: (g ⊙ s·B)ᵀ
    in_scale: torch.Tensor | None = None  # [in]: IA3 feed-forward vector minus one
    w_t: torch.Tensor | None = None  # [in, out]: the base weight as x·w_t (a view, never a copy)
    out_scale: torch.Tensor | None = None  # [out]
    out_shift: torch.Tensor | None = None  # [out]

    def nbytes(self) -> int:
        # w_t is the base model's own weight, not held by the slot
        return sum(t.nbytes for f in fields(self) if f.name != "w_t" and (t := getattr(self, f.name)) is not None)


def fold(p: ModuleWeights, base_bias: torch.Tensor | None, base_cols: torch.Tensor) -> SlotDelta | None:
    """One slot's parts in one layer folded into the `SlotDelta` its forward applies (None: nothing).

    base_bias: the layer's own bias [out] or None; base_cols: W0 as [in, out] (a view, for IA3 on a
    feed-forward module).
    """
    d = SlotDelta()
    shift = p.bias_delta
    if p.lora_bias is not None:
        shift = p.lora_bias if shift is None else shift + p.lora_bias
    if p.a is not None and p.b is not None:
        b = p.b
        if p.dora_g is not None:
            # PEFT DoRA: out = b_eff + g ⊙ (x·W0ᵀ + s·x·Aᵀ·Bᵀ), b_eff the (replaced) base bias.
            # From y = x·W0ᵀ + b_old: out = g ⊙ y + (b_eff - g ⊙ b_old), and g folds into B.
            g = p.dora_g
            d.out_scale = g
            b = g[:, None] * b
            if base_bias is not None:
                corr = base_bias * (1 - g)
                shift = corr if shift is None else shift + corr
        d.a_t = p.a.t().contiguous()  # [in, r]
        d.b_t = b.t().contiguous()  # [r, out]
    if p.ia3 is not None:
        if p.ia3_feedforward:
            # base(x ⊙ l) = y + (x ⊙ (l - 1))·W0ᵀ: no copy of W0 per slot
            d.in_scale = p.ia3 - 1
            d.w_t = base_cols
        else:
            # PEFT scales the whole output, bias included
            d.out_scale = p.ia3 if d.out_scale is None else d.out_scale * p.ia3
    d.out_shift = shift
    empty = d.a_t is None and d.in_scale is None and d.out_scale is None and d.out_shift is None
    return None if empty else d


def segment_lora(
    y: torch.Tensor, x: torch.Tensor, segments: Sequence[Segment], deltas: Sequence[SlotDelta | None]
) -> None:
    """Add each segment's adapter delta to `y` in place.

    y: [tokens, out] base output (bias included), x: [tokens, in] layer input,
    segments: adapter segments (slot >= 0), deltas: indexed by slot (None = nothing here).
    """
    for seg in segments:
        d = deltas[seg.slot]
        if d is None:
            continue
        ys = y[seg.start : seg.end]  # [rows, out], a view: in-place ops write into y
        xs = x[seg.start : seg.end]  # [rows, in]
        if d.in_scale is not None:
            ys.addmm_(xs * d.in_scale, d.w_t)
        if d.out_scale is not None:
            ys.mul_(d.out_scale)
        if d.out_shift is not None:
            ys.add_(d.out_shift)
        if d.a_t is not None:
            ys.addmm_(torch.mm(xs, d.a_t), d.b_t)


@dataclass
class MergedWeight:
    """One slot's merged copy of one layer (cache/merged.py): y = x·weightᵀ + bias stands for base + delta."""

    weight: torch.Tensor  # [out, in] (nn.Linear layout); may be W0 itself (a view) when only the bias changes
    bias: torch.Tensor | None  # [out]
    nbytes: int  # bytes this copy owns (a shared W0 view costs nothing)


def segment_unmerge(y: torch.Tensor, x: torch.Tensor, spans: Sequence[tuple[int, int]], d: SlotDelta) -> None:
    """dLoRA: give rows outside the merged slot back their base output, y -= x·Aᵀ·Bᵀ + out_shift, in place.

    Only for a plain LoRA merge (no in_scale / out_scale), where W_merged - W0 = B·A exactly.
    y: [tokens, out] computed with the merged weight, x: [tokens, in], spans: (start, end) row ranges.
    """
    if d.in_scale is not None or d.out_scale is not None:
        raise ValueError("only a plain LoRA merge can be subtracted; DoRA / IA3 merges are split instead")
    for start, end in spans:
        ys = y[start:end]
        if d.a_t is not None:
            ys.addmm_(torch.mm(x[start:end], d.a_t), d.b_t, alpha=-1)
        if d.out_shift is not None:
            ys.sub_(d.out_shift)


def dora_row_scale(w0: torch.Tensor, a: torch.Tensor, b_scaled: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's g = m / ‖W0 + s·B·A‖ per output row, as PEFT's DoraLinearLayer computes it.

    w0: [out, in] (Conv1D weights transposed first), a: [r, in], b_scaled: [out, r] = s·B,
    magnitude: [out]. Computed in float32 on w0's device; returns [out] float32 there.
    """
    dev = w0.device
    w = w0.float() + b_scaled.to(dev, torch.float32) @ a.to(dev, torch.float32)
    return magnitude.to(dev, torch.float32) / torch.linalg.norm(w, dim=1)
