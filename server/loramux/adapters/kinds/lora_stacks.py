"""One layer's plain-LoRA weights, stacked by rank bucket, dense, in slot order: what batched LoRA reads in place.

A slot of rank r goes to the bucket of rank ρ = the power of two ≥ r (at least 4):

    bucket ρ:  a: [cap, in, ρ]    b: [cap, ρ, out]    shift: [cap, out] (only once a member has a shift)
               order: the member slots, ascending; member i lives at stack index i

so a rank-8 adapter costs 8 columns even when a rank-256 one shares the layer (S-LoRA's point:
no padding every slot to the largest rank); ranks that are not a power of two are padded by less
than 2× (the extra columns are zeros, exact). Members are kept dense and sorted by slot: the
runner groups rows by slot in ascending order, so the adapters of one batch sit at consecutive
stack indices as far as they are all in the batch, and a run of them is one `bmm` on a view
(lora_batched.py): no weight is copied per step.

Costs are paid at install / evict time, not per forward: inserting or removing a member moves
the members after it by one index (one copy of the tail), capacity doubles when full and halves
when a quarter full or less, and a bucket whose last member leaves is freed. So a layer holds
about what its members need: `nbytes` counts the allocated stacks, capacity included (what is
really resident), and `slot_nbytes` one member's share (ρ·(in + out) elements, plus its shift).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Pair = tuple[torch.Tensor, torch.Tensor]
MIN_BUCKET = 4


def bucket_rank(r: int) -> int:
    """The bucket of a rank-r adapter: the power of two >= r, at least MIN_BUCKET."""
    if r < 1:
        raise ValueError(f"a LoRA rank must be >= 1, got {r}")
    return max(MIN_BUCKET, 1 << (r - 1).bit_length())


@dataclass
class Bucket:
    rank: int  # ρ: every member's A / B are padded to this many columns / rows
    a: torch.Tensor  # [cap, in, ρ]
    b: torch.Tensor  # [cap, ρ, out]
    shift: torch.Tensor | None = None  # [cap, out]
    order: list[int] = field(default_factory=list)  # member slots, ascending; slot order[i] is at index i

    @property
    def capacity(self) -> int:
        return int(self.a.shape[0])

    def index(self, slot: int) -> int:
        return self.order.index(slot)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.a, self.b, self.shift) if t is not None)


class LoraStacks:
    """Every plain-LoRA slot of one layer (see the module docstring). Slot deltas hold views into it."""

    def __init__(self, in_features: int, out_features: int) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self.buckets: dict[int, Bucket] = {}  # ρ -> bucket
        self.where: dict[int, int] = {}  # slot -> ρ of its bucket
        self.ranks: dict[int, int] = {}  # slot -> its true rank r
        self.shifted: set[int] = set()  # slots with an out_shift
        # what a forward's plan depends on: per bucket (ρ, member slots). The plan memo key.
        self.layout: tuple[tuple[int, tuple[int, ...]], ...] = ()
        self._plain: frozenset[int] = frozenset()

    @property
    def plain(self) -> frozenset[int]:
        """The member slots (kept with the layout: read by every forward of every layer)."""
        return self._plain

    def put(self, slot: int, a_t: torch.Tensor, b_t: torch.Tensor, shift: torch.Tensor | None) -> None:
        """Store slot's a_t [in, r], b_t [r, out] (and shift [out]), replacing whatever it held."""
        r = int(a_t.shape[1])
        rho = bucket_rank(r)
        if self.where.get(slot) != rho:
            self.drop(slot)
            self._insert(slot, rho, a_t)
        bk = self.buckets[rho]
        i = bk.index(slot)
        bk.a[i].zero_()
        bk.b[i].zero_()
        bk.a[i, :, :r] = a_t
        bk.b[i, :r] = b_t
        self.ranks[slot] = r
        self.shifted.discard(slot)
        if shift is not None:
            if bk.shift is None:
                bk.shift = a_t.new_zeros(bk.capacity, self.out_features)
            bk.shift[i] = shift
            self.shifted.add(slot)
        elif bk.shift is not None:
            bk.shift[i].zero_()
        self._relayout()

    def drop(self, slot: int) -> None:
        """Slot holds no plain LoRA here any more: remove it; the bucket shrinks or is freed."""
        rho = self.where.pop(slot, None)
        if rho is None:
            return
        self.ranks.pop(slot, None)
        self.shifted.discard(slot)
        bk = self.buckets[rho]
        i = bk.index(slot)
        n = len(bk.order)
        bk.order.pop(i)
        if not bk.order:
            del self.buckets[rho]
        else:
            for t in (bk.a, bk.b, bk.shift):
                if t is not None:
                    t[i : n - 1] = t[i + 1 : n].clone()  # move the tail down by one
                    t[n - 1].zero_()
            if len(bk.order) * 4 <= bk.capacity:
                self._resize(bk, max(1, 2 * len(bk.order)))
            if bk.shift is not None and not any(s in self.shifted for s in bk.order):
                bk.shift = None
        self._relayout()

    def views(self, slot: int) -> Pair:
        """Slot's A and B in place: [in, r], [r, out] (views; re-read after any put / drop)."""
        bk = self.buckets[self.where[slot]]
        i, r = bk.index(slot), self.ranks[slot]
        return bk.a[i, :, :r], bk.b[i, :r]

    def nbytes(self) -> int:
        """Bytes allocated for the stacks, unused capacity included: what this layer really holds."""
        return sum(bk.nbytes() for bk in self.buckets.values())

    def slot_nbytes(self, slot: int) -> int:
        """One member's share of the stacks: its padded A and B (and shift)."""
        rho = self.where.get(slot)
        if rho is None:
            return 0
        bk = self.buckets[rho]
        per = bk.a[0].nbytes + bk.b[0].nbytes
        return per + (bk.shift[0].nbytes if bk.shift is not None else 0)

    def _insert(self, slot: int, rho: int, like: torch.Tensor) -> None:
        bk = self.buckets.get(rho)
        if bk is None:
            bk = Bucket(rho, like.new_zeros(1, self.in_features, rho), like.new_zeros(1, rho, self.out_features))
            self.buckets[rho] = bk
        n = len(bk.order)
        if n == bk.capacity:
            self._resize(bk, 2 * bk.capacity)
        i = sum(s < slot for s in bk.order)
        for t in (bk.a, bk.b, bk.shift):
            if t is not None:
                t[i + 1 : n + 1] = t[i:n].clone()  # move the tail up by one
                t[i].zero_()
        bk.order.insert(i, slot)
        self.where[slot] = rho

    def _resize(self, bk: Bucket, cap: int) -> None:
        n = len(bk.order)
        a = bk.a.new_zeros(cap, self.in_features, bk.rank)
        b = bk.b.new_zeros(cap, bk.rank, self.out_features)
        a[:n], b[:n] = bk.a[:n], bk.b[:n]
        bk.a, bk.b = a, b
        if bk.shift is not None:
            shift = bk.shift.new_zeros(cap, self.out_features)
            shift[:n] = bk.shift[:n]
            bk.shift = shift

    def _relayout(self) -> None:
        self.layout = tuple((rho, tuple(bk.order)) for rho, bk in sorted(self.buckets.items()))
        self._plain = frozenset(self.where)
