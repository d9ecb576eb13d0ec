"""Batched LoRA: every plain-LoRA segment of a forward, reading the resident stacks in place.

`segment_lora` (kinds/lora.py) runs two small matmuls per segment per wrapped layer:
the reference path. Plain slots (x·Aᵀ·Bᵀ plus an optional out_shift; no IA3 / DoRA
scaling, which stay per segment) also live in the layer's `LoraStacks`
(lora_stacks.py): buckets of one rank ρ each, members dense and in slot order.

Paths (one interface: `apply_segments`; the forward context's `lora_path` picks one, and
`force` overrides it for the forwards the calling thread runs inside it: a contextvar, so the
engine's own thread never sees another thread's override):

- "segment": per segment, the reference.
- "grouped" (pure torch): per bucket, the segments are grouped into spans of
  consecutive stack indices; a span of k indices is one bmm pair on the views
  a[i:i+k] [k, in, ρ] and b[i:i+k] [k, ρ, out]. No weight is ever copied per step
  (the previous path gathered each segment's A and B with `index_select` in every
  layer, every step). The span's rows are x viewed as [k, m, in] when its segments
  are adjacent and all m rows long, else gathered and padded to the longest
  (activations, not weights; pads are dropped before the scatter), and scattered back
  with `index_add_`. A stack index inside a span with no rows in this forward is a
  block of padding.
- "triton" (CUDA): Punica-style SGMV kernels (lora_triton.py): per bucket, one shrink
  and one expand launch for all its segments, each program reading its segment's A and B
  in place through the segment's stack index. Any lengths, no padding, no gather.
- "auto": "triton" on CUDA when triton is installed, else "grouped".

The grouping is a cost model in multiply-accumulates (MACs), R = ρ·(in + out):

    segment alone            2·C_OP + n·R_r               (R_r: its true rank)
    span, a view             2·C_OP + k·m·R
    span, gathered           GATHER_OPS·C_OP + k·m·R + k·m·(in + out)·C_COPY

and the split of a bucket's segments (sorted by stack index) into spans that costs least is
found by dynamic programming, after the segments longer than LONG × the bucket's median
(prefills among decode rows) are set aside to run alone. C_OP (one op's fixed cost) and C_COPY (one element gathered or
scattered) were measured on this 2-core CPU (scripts/bench_lora_kernels.py --calibrate;
README, "How adapter arithmetic is batched"): a poor value costs speed, never accuracy.
Every path computes the same sums, exact to float rounding.

A forward's plans are built once per stack layout (`prepare`, lora_plan.py), not per layer, and
their index tensors ride in the runner's one host-to-device copy of the forward's indices.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from loramux.adapters.kinds.lora import SlotDelta, segment_lora
from loramux.adapters.kinds.lora_plan import BucketPlan, HostIndices, Span, make_span, sgmv_rows
from loramux.adapters.kinds.lora_stacks import Bucket, LoraStacks
from loramux.engine.forward_context import LORA_PATHS, AdapterContext, Segment

PATHS = LORA_PATHS
_FORCED: ContextVar[str | None] = ContextVar("loramux_lora_path", default=None)
C_OP = 2e5  # one op's fixed cost, in MACs (CPU, 2 threads; see the module docstring)
C_COPY = 4.0  # one element gathered or scattered, in MACs
GATHER_OPS = 5  # gather x, bmm, bmm, drop pads, scatter
LONG = 4  # a segment longer than LONG × the median of its bucket's runs alone


@contextmanager
def force(path: str) -> Iterator[None]:
    """Run this thread's enclosed forwards on LoRA path `path` (one of PATHS), whatever their context
    says; then restore the previous override."""
    if path not in PATHS:
        raise ValueError(f"LoRA path must be one of {PATHS}, got {path!r}")
    token = _FORCED.set(path)
    try:
        yield
    finally:
        _FORCED.reset(token)


def resolve(requested: str, device: torch.device) -> str:
    """The concrete path of a forward whose context asks for `requested` (`force`'s override first):
    "auto" is "triton" on CUDA with triton installed, else "grouped"; a "triton" off CUDA runs in
    Triton's interpreter (tests)."""
    forced = _FORCED.get()
    path = requested if forced is None else forced
    if path != "auto":
        return path
    if device.type == "cuda":
        from loramux.adapters.kinds import lora_triton

        if lora_triton.available():
            return "triton"
    return "grouped"


def group(segs: list[tuple[Segment, int]], rank: int, true_rank: dict[int, int], io: int) -> list[list]:
    """The cheapest split of (segment, stack index) pairs, sorted by index, into spans (module docstring).

    Dynamic programming over split points, O(n²) with each span's cost kept incrementally:
    best[j] = min over i of best[i] + cost(segs[i:j]); a span of one segment runs alone.
    """
    n = len(segs)
    rk = rank * io
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for i in range(n):
        m, lo, rows_min, contiguous = 0, segs[i][1], math.inf, True
        for j in range(i, n):
            seg, idx = segs[j]
            length = seg.end - seg.start
            m, rows_min = max(m, length), min(rows_min, length)
            if j > i:
                prev, pidx = segs[j - 1]
                contiguous = contiguous and idx == pidx + 1 and prev.end == seg.start
            k = idx - lo + 1
            if j == i:
                cost = 2 * C_OP + length * true_rank[seg.slot] * io
            elif contiguous and rows_min == m:
                cost = 2 * C_OP + k * m * rk
            else:
                cost = GATHER_OPS * C_OP + k * m * (rk + io * C_COPY)
            if best[i] + cost < best[j + 1]:
                best[j + 1], cut[j + 1] = best[i] + cost, i
    groups: list[list[tuple[Segment, int]]] = []
    j = n
    while j > 0:
        groups.append(segs[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def plan_bucket(
    bk: Bucket, segments: Sequence[Segment], stacks: LoraStacks, path: str, device: torch.device
) -> BucketPlan:
    """One bucket's plan for `segments`, its indices copied to `device` on their own (tests; forwards
    take `prepare`'s plans, whose indices ride in the runner's one copy)."""
    host = HostIndices()
    plan = _plan_bucket(bk, segments, stacks, path, host)
    host.copy(device)
    return plan


def _plan_bucket(
    bk: Bucket, segments: Sequence[Segment], stacks: LoraStacks, path: str, host: HostIndices
) -> BucketPlan:
    pos = {slot: i for i, slot in enumerate(bk.order)}
    segs = sorted(((s, pos[s.slot]) for s in segments if s.slot in pos), key=lambda t: t[1])
    plan = BucketPlan(bk.rank)
    if path == "triton":
        sgmv_rows(segs, plan, host)
        return plan
    if segs:
        # long segments (prefills among decode rows) run alone: in a span they would pad every other
        # segment to their length, and their own matmuls are large enough to amortise their ops
        lens = sorted(s.end - s.start for s, _ in segs)
        limit = max(1, LONG * lens[len(lens) // 2])
        plan.singles = [t for t in segs if t[0].end - t[0].start > limit]
        segs = [t for t in segs if t[0].end - t[0].start <= limit]
    for g in group(segs, bk.rank, stacks.ranks, stacks.in_features + stacks.out_features):
        if len(g) == 1:
            plan.singles.append(g[0])
        else:
            plan.spans.append(make_span(g, host))
    return plan


def prepare(ctx: AdapterContext, stacks: LoraStacks, which: str, device: torch.device, host: HostIndices) -> None:
    """Plan `stacks`' buckets for ctx's `which` segments, once per forward per layout (the memo); the
    plans' index lists go into `host`, which the runner copies with the forward's other indices."""
    path = resolve(ctx.lora_path, device)
    if path != "segment" and stacks.buckets:
        ctx.memo(_plan_key(which, stacks, path), lambda: _plans(ctx, stacks, which, path, host))


def _plan_key(which: str, stacks: LoraStacks, path: str) -> tuple:
    return ("lora_plan", which, stacks.layout, path, C_OP, C_COPY)


def _plans(ctx: AdapterContext, stacks: LoraStacks, which: str, path: str, host: HostIndices) -> list[BucketPlan]:
    segments = ctx.adapter_segments if which == "all" else ctx.other_adapter_segments
    return [_plan_bucket(bk, segments, stacks, path, host) for _, bk in sorted(stacks.buckets.items())]


def run_span(y: torch.Tensor, x: torch.Tensor, bk: Bucket, span: Span, shifted: bool) -> None:
    """y[rows] += x[rows]·A·B (+ shift) for one span, reading the stacks through views."""
    a = bk.a[span.lo : span.lo + span.k]  # [k, in, ρ], a view
    b = bk.b[span.lo : span.lo + span.k]  # [k, ρ, out], a view
    shift = bk.shift[span.lo : span.lo + span.k, None, :] if shifted and bk.shift is not None else None  # [k, 1, out]
    k, m = span.k, span.m
    if span.view is not None:
        lo, hi = span.view
        xp = x[lo:hi].reshape(k, m, -1)  # [k, m, in], a view when x is contiguous
        yv = y[lo:hi].view(k, m, -1)  # [k, m, out], writes into y
        if shift is not None:
            yv += shift
        torch.baddbmm(yv, torch.bmm(xp, a), b, out=yv)
        return
    if span.idx is None:
        raise ValueError("a gathered span needs its gather indices")
    xp = x.index_select(0, span.idx).view(k, m, -1)  # [k, m, in]: activations, never weights
    xa = torch.bmm(xp, a)  # [k, m, ρ]
    flat = (torch.bmm(xa, b) if shift is None else torch.baddbmm(shift, xa, b)).view(k * m, -1)  # [k·m, out]
    if span.valid is not None:
        flat = flat.index_select(0, span.valid)  # [n_real, out]: pads dropped
    y.index_add_(0, span.rows if span.rows is not None else span.idx, flat)


def apply_segments(
    y: torch.Tensor,
    x: torch.Tensor,
    ctx: AdapterContext,
    segments: Sequence[Segment],
    deltas: Sequence[SlotDelta | None],
    stacks: LoraStacks,
    which: str,
) -> None:
    """Add every segment's delta to y [tokens, out] in place, on the forward's LoRA path.

    `which` names the context's segment list (the plan memo key): "all" = ctx.adapter_segments,
    "others" = ctx.other_adapter_segments.
    """
    path = resolve(ctx.lora_path, y.device)
    if path == "segment" or not stacks.buckets:
        segment_lora(y, x, segments, deltas)
        return

    def unprepared() -> list[BucketPlan]:  # a forward the runner did not prepare: its own copy
        host = HostIndices()
        plans = _plans(ctx, stacks, which, path, host)
        host.copy(y.device)
        return plans

    plans = ctx.memo(_plan_key(which, stacks, path), unprepared)
    plain = stacks.plain
    rest = [s for s in segments if s.slot not in plain]  # DoRA, IA3, shifted-only slots: per segment
    if rest:
        segment_lora(y, x, rest, deltas)
    shifted = bool(stacks.shifted)
    for plan in plans:
        bk = stacks.buckets[plan.rank]
        if plan.sgmv is not None:
            from loramux.adapters.kinds import lora_triton

            lora_triton.sgmv(y, x, bk, plan.sgmv, plan.maxlen, shifted)
            continue
        for span in plan.spans:
            run_span(y, x, bk, span, shifted)
        if plan.singles:
            segment_lora(y, x, [s for s, _ in plan.singles], deltas)


def flop_ceiling(base_macs: float, lora_macs: float) -> float:
    """What mixed ÷ base throughput can reach at best: base MACs ÷ (base + LoRA MACs)."""
    return base_macs / (base_macs + lora_macs) if base_macs + lora_macs > 0 else math.nan
