"""How one layer's merged copy is computed, what it costs in bytes, and what the unmerged delta costs.

For a slot's adapter in one wrapped linear, what the layer computes unmerged is
(kinds/lora.py's SlotDelta order, W0: [out, in], b0: [out]):

    y = ((x ⊙ l_in)·W0ᵀ + b0) ⊙ o + shift + x·Aᵀ·(g ⊙ s·B)ᵀ

with l_in the IA3 feed-forward vector, o = g (DoRA) or the IA3 output vector,
shift = bias delta + LoRA bias (+ (1 - g) ⊙ b0 for DoRA). So the merged layer is
y = x·Wᵀ + b with, in float32 and then cast to the model's dtype:

    W = o ⊙_rows (W0 ⊙_cols l_in) + (g ⊙ s·B)·A      LoRA: W0 + s·BA;  DoRA: g ⊙ (W0 + s·BA)
    b = o ⊙ b0 + shift                               DoRA: b0 + shifts (g cancels on the bias)

W0 is never written: every merged weight is a new tensor (or W0 itself, shared,
for a layer whose only change is its bias). Bottleneck and soft-prompt adapters
change no weight and cannot be merged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from loramux.adapters.cache.merge_policy import MergeCost
from loramux.adapters.kinds.lora import MergedWeight
from loramux.adapters.kinds.peft_adapter import ModuleWeights
from loramux.adapters.model.linear import MultiAdapterLinear

# per layer: (layer name, a copy of what the slot holds there, W0 [out, in], b0 [out] or None)
Snapshot = list[tuple[str, ModuleWeights, torch.Tensor, torch.Tensor | None]]


def _changes_weight(parts: ModuleWeights) -> bool:
    return parts.a is not None or parts.ia3 is not None


def merged_nbytes(layer: MultiAdapterLinear, slot: int) -> int:
    """What merge_layer will allocate for this layer: a new weight, a new bias, both or neither."""
    p, w, b0 = layer.parts(slot), layer.base_layer.weight, layer.bias
    scaled = p.dora_g is not None or (p.ia3 is not None and not p.ia3_feedforward)
    shifted = p.bias_delta is not None or p.lora_bias is not None or (p.dora_g is not None and b0 is not None)
    owns_bias = shifted or (b0 is not None and scaled)
    return (w.numel() if _changes_weight(p) else 0) * w.element_size() + (
        layer.out_features * w.element_size() if owns_bias else 0
    )


def merge_cost(layers: Iterable[MultiAdapterLinear], slot: int) -> MergeCost:
    """What the adapter's delta costs per row, unmerged (for merge_policy.choose_mode)."""
    macs, subtractable, n = 0, True, 0
    for lay in layers:
        p = lay.parts(slot)
        n += 1
        if p.a is not None:
            macs += p.a.shape[0] * (lay.in_features + lay.out_features)
        if p.ia3 is not None and p.ia3_feedforward:
            macs += lay.in_features * lay.out_features  # (x ⊙ (l - 1))·W0ᵀ: a full extra matmul
        if p.dora_g is not None or p.ia3 is not None:
            macs += lay.out_features
            subtractable = False
    return MergeCost(row_macs=macs, layers=n, subtractable=subtractable)


@torch.no_grad()  # not inference_mode: merged copies are normal tensors, as the base weights are, so that the
# compiled all-merged graphs (engine/compiled.py, compiled with W0 in their place) accept them
def merge_all(snapshot: Snapshot, dtype: torch.dtype) -> dict[str, MergedWeight]:
    """Worker thread: every layer's merged weight and bias (see the module docstring)."""
    return {name: merge_layer(w0, b0, parts, dtype) for name, parts, w0, b0 in snapshot}


def merge_layer(w0: torch.Tensor, b0: torch.Tensor | None, p: ModuleWeights, dtype: torch.dtype) -> MergedWeight:
    """One layer: w0 [out, in] (a view of the base weight, only read), b0 [out] or None, p: its ModuleWeights."""
    f32 = torch.float32
    out_scale = None  # [out]
    if p.dora_g is not None:
        out_scale = p.dora_g.to(f32)
    if p.ia3 is not None and not p.ia3_feedforward:
        out_scale = p.ia3.to(f32) if out_scale is None else out_scale * p.ia3.to(f32)
    shift = None  # [out]
    for t in (p.bias_delta, p.lora_bias):
        if t is not None:
            shift = t.to(f32) if shift is None else shift + t.to(f32)
    if p.dora_g is not None and b0 is not None:
        corr = b0.to(f32) * (1 - p.dora_g.to(f32))
        shift = corr if shift is None else shift + corr
    bias = None  # [out] float32, or None when the layer's bias is b0 unchanged (or absent)
    if b0 is not None and out_scale is not None:
        bias = b0.to(f32) * out_scale
    if shift is not None:
        base = bias if bias is not None else (b0.to(f32) if b0 is not None else None)
        bias = shift if base is None else base + shift
    bias_out = bias.to(dtype).contiguous() if bias is not None else b0

    if not _changes_weight(p):
        return MergedWeight(w0, bias_out, 0 if bias is None else bias_out.nbytes)
    w = w0.to(f32, copy=True)  # [out, in]; a new tensor: W0 itself is never written
    if p.ia3 is not None and p.ia3_feedforward:
        w.mul_(p.ia3.to(f32)[None, :])
    if out_scale is not None:
        w.mul_(out_scale[:, None])
    if p.a is not None:
        b = p.b.to(f32)  # [out, r], s folded in
        if p.dora_g is not None:
            b = p.dora_g.to(f32)[:, None] * b
        w.addmm_(b, p.a.to(f32))
    w_out = w.to(dtype).contiguous()
    return MergedWeight(w_out, bias_out, w_out.nbytes + (0 if bias is None else bias_out.nbytes))
