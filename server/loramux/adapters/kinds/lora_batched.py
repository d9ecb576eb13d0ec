"""Batched LoRA: one gathered multiply over every plain-LoRA segment of a forward (Punica / S-LoRA style).

`segment_lora` (kinds/lora.py) runs two small matmuls per segment per wrapped
layer; with 16 adapters in a batch that is 32 kernel launches per layer (CUDA)
or 32 thread barriers (multi-threaded CPU). Here every layer keeps its slots'
LoRA weights stacked and zero-padded to the largest installed rank:

    A_all: [slots, in, r_max]    B_all: [slots, r_max, out]    shift_all: [slots, out]

and one forward's plain-LoRA segments are padded to a common length and run as
two `bmm`s, whatever the number of segments:

    xp = x[idx]                        [nseg, maxlen, in]   (pad entries read row 0)
    yb = (xp @ A_all[seg]) @ B_all[seg] [nseg, maxlen, out]
    y.index_add_(0, rows, yb[valid])   pad entries dropped

"Plain" means the slot's `SlotDelta` is x·Aᵀ·Bᵀ plus an optional `out_shift`
(LoRA bias, base-bias delta): no `in_scale` / `out_scale` (IA3, DoRA), whose
segments stay on the per-segment path. Slots that hold nothing plain here are
zeros in the stacks, so a wrong index can only add zero.

The gather indices (`BatchPlan`) depend only on the forward's segments and on
which slots a layer holds plain LoRA in, so `AdapterContext.memo` builds each
once per forward and every layer with the same slot set shares it.

The path is the forward context's `lora_path` ("auto", "batched", "segment");
`force` overrides it for the forwards that the calling thread runs inside it
(tests and benchmarks compare the paths with it; a contextvar, so the engine's
own thread never sees another thread's override).

Heuristic (`plan_segments`, path "auto"): pad waste is bounded first, by moving
the longest segments to the per-segment path until nseg·maxlen <= PAD_LIMIT·rows
(long segments, i.e. prefills, lose nothing there: their own matmuls are large and
their op cost is amortised); then batch when at least `MIN_SEGMENTS` remain if
they are equal and adjacent (no gather: x and y are viewed as [nseg, len, ·]), or
`MIN_SEGMENTS_GATHER` otherwise (the gather and scatter cost as much as a few
segments). The thresholds come from CPU measurements (see below).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from loramux.adapters.kinds.lora import SlotDelta, segment_lora
from loramux.engine.forward_context import LORA_PATHS, AdapterContext, Segment

Pair = tuple[torch.Tensor, torch.Tensor]

# Fewer plain segments than this and per-segment matmuls are as cheap. Measured on a 2-core CPU (hidden 512,
# r16, 64 rows; see scripts/bench_lora_kernels.py): per segment costs ~7 us a layer, a batched layer ~30-40 us
# when the segments are equal and adjacent (a view, no gather) and ~60-80 us when rows must be gathered and
# scattered. On CUDA, where every op is a launch, the break-even is lower; these are the conservative figures.
MIN_SEGMENTS = 4  # equal-length adjacent segments (the no-gather span path)
MIN_SEGMENTS_GATHER = 8  # any other layout (padding, base rows between segments)
PAD_LIMIT = 2.0  # padded rows (nseg·maxlen) allowed per real row
# "auto": batch by the heuristic below; "batched": batch every plain segment (no pad limit);
# "segment": never batch (the reference path).
MODES = LORA_PATHS
_FORCED: ContextVar[str | None] = ContextVar("loramux_lora_path", default=None)


@contextmanager
def force(mode: str) -> Iterator[None]:
    """Run this thread's enclosed forwards on LoRA path `mode` ("auto", "batched" or "segment"), whatever
    their context says; then restore the previous override."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    token = _FORCED.set(mode)
    try:
        yield
    finally:
        _FORCED.reset(token)


def lora_path(requested: str = "auto") -> str:
    """The path a forward whose context asks for `requested` takes: `force`'s override, if any."""
    forced = _FORCED.get()
    return requested if forced is None else forced


@dataclass
class BatchPlan:
    """One forward's gather indices for a set of plain-LoRA segments, on the model's device."""

    segments: list[Segment]  # the batched segments
    rest: list[Segment]  # the other segments given: per-segment path
    seg_slots: torch.Tensor  # [nseg] int64: each batched segment's slot
    # the slots are lo, lo+1, ..., hi-1 in order (the runner sorts rows by slot): stacks sliced, not gathered
    slot_range: tuple[int, int] | None
    maxlen: int
    # contiguous equal-length segments covering rows [lo, hi): a view, no gather, no scatter
    span: tuple[int, int] | None
    idx: torch.Tensor | None  # [nseg·maxlen] int64: source row of each padded entry (pads read row 0)
    valid: torch.Tensor | None  # [n_valid] int64: padded entries that are real rows (None: no padding)
    rows: torch.Tensor | None  # [n_valid] int64: the row each real entry adds into
    pad: torch.Tensor | None  # [nseg, maxlen, 1] bool: True at pad entries (None: no padding)


def plan_segments(
    segments: Sequence[Segment], plain: frozenset[int], device: torch.device, path: str = "auto"
) -> BatchPlan | None:
    """Split `segments` into a batched set (slots in `plain`) and the rest; None when batching does not pay."""
    mode = lora_path(path)
    if mode == "segment":
        return None
    cand = [s for s in segments if s.slot in plain]
    if mode == "auto":
        # drop the longest segments (they go per segment) until padding is bounded; sorted: longest last
        cand.sort(key=lambda s: s.end - s.start)
        total = sum(s.end - s.start for s in cand)
        while cand and len(cand) * (cand[-1].end - cand[-1].start) > PAD_LIMIT * total:
            total -= cand[-1].end - cand[-1].start
            cand.pop()
        if len(cand) < MIN_SEGMENTS:
            return None
        cand.sort(key=lambda s: s.start)
    if not cand:
        return None
    chosen = set(cand)
    rest = [s for s in segments if s not in chosen]
    lens = [s.end - s.start for s in cand]
    maxlen = max(lens)
    slot_list = [s.slot for s in cand]
    seg_slots = torch.tensor(slot_list, dtype=torch.long, device=device)
    lo_slot, hi_slot = slot_list[0], slot_list[-1] + 1
    slot_range = (lo_slot, hi_slot) if slot_list == list(range(lo_slot, hi_slot)) else None
    contiguous = all(n == maxlen for n in lens) and all(a.end == b.start for a, b in zip(cand, cand[1:]))
    if mode == "auto" and not contiguous and len(cand) < MIN_SEGMENTS_GATHER:
        return None
    if contiguous:
        span = (cand[0].start, cand[-1].end)
        return BatchPlan(cand, rest, seg_slots, slot_range, maxlen, span, None, None, None, None)
    starts = torch.tensor([s.start for s in cand], dtype=torch.long)
    offs = torch.arange(maxlen, dtype=torch.long)
    real = offs[None, :] < torch.tensor(lens, dtype=torch.long)[:, None]  # [nseg, maxlen]
    idx = torch.where(real, starts[:, None] + offs[None, :], 0).reshape(-1)
    valid = real.reshape(-1).nonzero().squeeze(1)
    padded = int(valid.numel()) != idx.numel()
    return BatchPlan(
        cand, rest, seg_slots, slot_range, maxlen, None,
        idx.to(device),
        valid.to(device) if padded else None,
        idx[valid].to(device),
        (~real)[:, :, None].to(device) if padded else None,
    )  # fmt: skip


class StackedLora:
    """One layer's plain-LoRA weights for every slot, stacked and zero-padded (see the module docstring).

    Allocated on the first plain slot; grows (re-allocates) when a slot index or a rank exceeds it.
    The slots' `SlotDelta.a_t` / `b_t` are views into these stacks, so the weights are held once.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self.a_all: torch.Tensor | None = None  # [n, in, r_max]
        self.b_all: torch.Tensor | None = None  # [n, r_max, out]
        self.shift_all: torch.Tensor | None = None  # [n, out]; allocated on the first out_shift
        self.ranks: dict[int, int] = {}  # slot -> rank, for every plain slot
        self.shifted: set[int] = set()  # plain slots with an out_shift
        self.plain: frozenset[int] = frozenset()  # the plain slots: the memo key of this layer's plan

    def put(self, slot: int, a_t: torch.Tensor, b_t: torch.Tensor, shift: torch.Tensor | None) -> Pair:
        """Store slot's a_t [in, r], b_t [r, out] (and shift [out]); returns the views to use as a_t, b_t."""
        r = a_t.shape[1]
        n = 0 if self.a_all is None else self.a_all.shape[0]
        r_max = 0 if self.a_all is None else self.a_all.shape[2]
        if slot >= n or r > r_max:
            self._grow(max(n, slot + 1), max(r_max, r), a_t)
        a_all, b_all = self.stacks()
        a_all[slot].zero_()
        b_all[slot].zero_()
        a_all[slot, :, :r] = a_t
        b_all[slot, :r] = b_t
        self.ranks[slot] = r
        self.shifted.discard(slot)
        if shift is not None:
            if self.shift_all is None:
                self.shift_all = a_t.new_zeros(a_all.shape[0], self.out_features)
            self.shift_all[slot] = shift
            self.shifted.add(slot)
        elif self.shift_all is not None:
            self.shift_all[slot].zero_()
        self.plain = frozenset(self.ranks)
        return self.views(slot)

    def drop(self, slot: int) -> None:
        """Slot holds no plain LoRA here any more: zero it so batched segments of it add nothing."""
        if slot not in self.ranks:
            return
        del self.ranks[slot]
        self.shifted.discard(slot)
        a_all, b_all = self.stacks()
        a_all[slot].zero_()
        b_all[slot].zero_()
        if self.shift_all is not None:
            self.shift_all[slot].zero_()
        self.plain = frozenset(self.ranks)

    def views(self, slot: int) -> Pair:
        a_all, b_all = self.stacks()
        r = self.ranks[slot]
        return a_all[slot, :, :r], b_all[slot, :r]  # [in, r], [r, out]

    def stacks(self) -> Pair:
        if self.a_all is None or self.b_all is None:
            raise ValueError("this layer holds no LoRA weights to batch")
        return self.a_all, self.b_all

    def _grow(self, n: int, r_max: int, like: torch.Tensor) -> None:
        a_all = like.new_zeros(n, self.in_features, r_max)
        b_all = like.new_zeros(n, r_max, self.out_features)
        if self.a_all is not None and self.b_all is not None:
            n0, _, r0 = self.a_all.shape
            a_all[:n0, :, :r0] = self.a_all
            b_all[:n0, :r0] = self.b_all
        if self.shift_all is not None:
            shift_all = like.new_zeros(n, self.out_features)
            shift_all[: self.shift_all.shape[0]] = self.shift_all
            self.shift_all = shift_all
        self.a_all, self.b_all = a_all, b_all

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.a_all, self.b_all, self.shift_all) if t is not None)


def batched_lora(y: torch.Tensor, x: torch.Tensor, plan: BatchPlan, stacked: StackedLora) -> None:
    """y[rows] += x[rows]·Aᵀ·Bᵀ (+ shift) for every segment of `plan`, in place, in O(1) ops.

    y: [tokens, out], x: [tokens, in]; the plan's slots must be plain LoRA slots of `stacked` (or zeros there).
    """
    a_all, b_all = stacked.stacks()
    nseg, m = plan.seg_slots.shape[0], plan.maxlen
    if plan.slot_range is not None:
        a, b = a_all[plan.slot_range[0] : plan.slot_range[1]], b_all[plan.slot_range[0] : plan.slot_range[1]]
    else:
        a = a_all.index_select(0, plan.seg_slots)  # [nseg, in, r_max]
        b = b_all.index_select(0, plan.seg_slots)  # [nseg, r_max, out]
    shift = None
    if stacked.shift_all is not None and any(s.slot in stacked.shifted for s in plan.segments):
        shift = stacked.shift_all.index_select(0, plan.seg_slots)[:, None, :]  # [nseg, 1, out]
    if plan.span is not None:
        lo, hi = plan.span
        xp = x[lo:hi].reshape(nseg, m, -1)  # [nseg, m, in], a view when x is contiguous
        yv = y[lo:hi].view(nseg, m, -1)  # [nseg, m, out], writes into y
        if shift is not None:
            yv += shift
        torch.baddbmm(yv, torch.bmm(xp, a), b, out=yv)
        return
    elif plan.idx is not None:
        xp = x.index_select(0, plan.idx).view(nseg, m, -1)  # [nseg, m, in]
    else:
        raise ValueError("a batch plan needs a row span or gather indices")
    xa = torch.bmm(xp, a)  # [nseg, m, r_max]
    if shift is None:
        # zero the pad entries while they are narrow (r_max wide, not out): they then add 0 to row 0,
        # and every entry scatters without first selecting the real ones
        if plan.pad is not None:
            xa.masked_fill_(plan.pad, 0)
        if plan.idx is None:
            raise ValueError("a gathered batch plan needs its gather indices")
        y.index_add_(0, plan.idx, torch.bmm(xa, b).view(nseg * m, -1))
        return
    yb = torch.bmm(xa, b)  # [nseg, m, out]
    yb += shift
    flat = yb.view(nseg * m, -1)  # [nseg·m, out]
    if plan.valid is not None:
        flat = flat.index_select(0, plan.valid)  # [n_valid, out]
    if plan.rows is None:
        raise ValueError("a gathered batch plan needs its target rows")
    y.index_add_(0, plan.rows, flat)


def apply_segments(
    y: torch.Tensor,
    x: torch.Tensor,
    ctx: AdapterContext,
    segments: Sequence[Segment],
    deltas: Sequence[SlotDelta | None],
    stacked: StackedLora,
    which: str,
) -> None:
    """Add every segment's delta to y [tokens, out] in place: batched where it pays, per segment otherwise.

    `which` names the context's segment list (the plan memo key): "all" = ctx.adapter_segments,
    "others" = ctx.other_adapter_segments.
    """
    mode = lora_path(ctx.lora_path)
    if stacked.plain and mode != "segment":
        plain = stacked.plain
        plan = ctx.memo(
            ("lora_plan", which, plain, mode, MIN_SEGMENTS, PAD_LIMIT),
            lambda: plan_segments(segments, plain, ctx.slots.device, mode),
        )
        if plan is not None:
            batched_lora(y, x, plan, stacked)
            segments = plan.rest
    segment_lora(y, x, segments, deltas)
