"""What one forward's batched LoRA does per rank bucket (its plan), and the index tensors the plan reads.

A plan is built once per forward per stack layout (lora_batched.py: `prepare`, memoised in the
forward context) and read by every wrapped layer of that layout. Its index tensors (gather rows,
scatter rows, SGMV segment rows) are built on the host as int lists in `HostIndices`: the runner
puts them into the forward's one host buffer and its one copy to the device (engine/runner.py),
beside the attention indices, and `bind` points the plans at the copied tensors. No layer copies
an index to the device; a forward the runner did not prepare (a test driving the model itself)
gets its plans' indices in one copy of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loramux.engine.forward_context import Segment, to_device


class HostIndices:
    """Int lists bound for the device, each with the plan attribute its tensor becomes."""

    def __init__(self) -> None:
        self.lists: list[list[int]] = []
        self._targets: list[tuple[object, str, tuple[int, ...] | None]] = []

    def add(self, obj: object, attr: str, values: list[int], shape: tuple[int, ...] | None = None) -> None:
        """`obj.attr` will be `values` as an int64 tensor on the device (viewed as `shape`)."""
        self.lists.append(values)
        self._targets.append((obj, attr, shape))

    def bind(self, tensors: list[torch.Tensor]) -> None:
        """Set every attribute from `tensors` (the copied lists, in `lists` order)."""
        if len(tensors) != len(self._targets):
            raise ValueError(f"{len(self._targets)} index lists, {len(tensors)} tensors")
        for (obj, attr, shape), t in zip(self._targets, tensors):
            setattr(obj, attr, t.view(shape) if shape is not None else t)

    def copy(self, device: torch.device) -> None:
        """Copy and bind on their own (forwards the runner did not prepare)."""
        if self.lists:
            self.bind(to_device(self.lists, device))


@dataclass
class Span:
    """k consecutive stack indices [lo, lo + k) of one bucket, run as one bmm pair."""

    lo: int
    k: int
    m: int  # rows per index (the longest segment's)
    segments: list[Segment]
    view: tuple[int, int] | None = None  # rows [start, end) as [k, m, ·]: no gather, no scatter
    idx: torch.Tensor | None = None  # [k·m] source row of each entry (pads read the first row)
    valid: torch.Tensor | None = None  # [n_real] entries that are real rows (None: all)
    rows: torch.Tensor | None = None  # [n_real] the row each real entry adds into (None: idx)


@dataclass
class BucketPlan:
    rank: int
    spans: list[Span] = field(default_factory=list)
    singles: list[tuple[Segment, int]] = field(default_factory=list)  # (segment, stack index): two matmuls on views
    sgmv: torch.Tensor | None = None  # triton: [nseg, 3] int64 (start, length, stack index)
    maxlen: int = 0


def make_span(g: list[tuple[Segment, int]], host: HostIndices) -> Span:
    """The span of (segment, stack index) pairs `g` (sorted by index); its gather indices go into `host`.

    Entry (i - lo)·m + j of the [k·m] gathered rows is row start + j of the segment at stack
    index i, for j < its length; the others are pads (they read the span's first row, and are
    dropped by `valid` before the scatter)."""
    lo, hi = g[0][1], g[-1][1] + 1
    k = hi - lo
    lens = [s.end - s.start for s, _ in g]
    m = max(lens)
    span = Span(lo, k, m, [s for s, _ in g])
    if k == len(g) and min(lens) == m and all(a.end == b.start for (a, _), (b, _) in zip(g, g[1:])):
        span.view = (g[0][0].start, g[-1][0].end)
        return span
    src = [g[0][0].start] * (k * m)
    real = [False] * (k * m)
    for s, i in g:
        base = (i - lo) * m
        src[base : base + s.end - s.start] = range(s.start, s.end)
        real[base : base + s.end - s.start] = [True] * (s.end - s.start)
    host.add(span, "idx", src)
    if all(real):
        return span  # every entry is a real row: it adds into the row it read (rows = idx)
    valid = [e for e, r in enumerate(real) if r]
    host.add(span, "valid", valid)
    host.add(span, "rows", [src[e] for e in valid])
    return span


def sgmv_rows(segs: list[tuple[Segment, int]], plan: BucketPlan, host: HostIndices) -> None:
    """The triton path's plan: one row (start, length, stack index) per segment, and the longest length."""
    if segs:
        flat = [v for s, i in segs for v in (s.start, s.end - s.start, i)]
        host.add(plan, "sgmv", flat, (len(segs), 3))
        plan.maxlen = max(s.end - s.start for s, _ in segs)
