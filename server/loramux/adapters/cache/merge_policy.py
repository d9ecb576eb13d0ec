"""The merged cache's two decisions: which adapters are hot, and how to run a batch with a merged one.

Hot: an adapter whose share of the last `window_tokens` forward tokens (prefill and
decode, base-model tokens included in the total) reaches the threshold. Shares
are only judged once half a window has been seen, so a lone first request does
not merge its adapter. An auto-merged adapter is unmerged when its share falls
below half the threshold (hysteresis, so an adapter near the threshold does not
flap).

How to run a batch (`choose_mode`): a simple cost model in multiply-accumulates
(MACs). With T_m rows of the merged adapter, T_o other rows, R = Σ r·(in + out) its
delta's MACs per row, L the layers it touches, c_op what launching one op costs and
F what one forward of the model costs beyond its rows, both expressed in MACs:

    unmerged  T_m·R + j·2·L·c_op               the merged adapter's own delta, as if not merged
    subtract  T_o·R + 2·L·spans·c_op           dLoRA: every other row undoes B·A (plain LoRA only)
    split     F                                a second forward for the other rows: its fixed cost

j is 0 when other plain-LoRA rows are in the batch (`joins_batched`): the batched LoRA
paths (kinds/lora_batched.py) then run the merged adapter's segment inside the span or
SGMV launch they run anyway, so unmerged it costs its MACs and no ops of its own; else 1
(two matmuls per layer). The cheapest wins; a batch of only merged rows always runs merged.

F = FORWARD_ROWS · P, P the model's MACs per row (its 2-D weights but the embedding table):
a forward of B rows takes about a + b·B, and a / b, its fixed cost in rows, is what a second
forward costs beyond its own rows. It reads every weight again, which at a few rows per step is
most of a step. Measured with `scripts/calibrate_merge_policy.py` (the bench's CPU model, one
thread): a / b = 15-19 rows with compiled decode steps over five runs, 27 eager; so 18. The
earlier guess, 30 ops per decoder layer at c_op each, put a split at about a ninth of that (2 rows
of that model), and at rank 128 the policy picked it for 64-row batches that ran 7-16% slower
split than unmerged. On CUDA F is an estimate from the roofline, not a measurement: a forward
of few rows is bound by reading the weights, and an H100 / H200 reads a bf16 weight in the time
of 300 / 200 of its multiply-adds, so 256. c_op on CPU is measured (`scripts/bench_lora_kernels.py
--calibrate`: one small op ≈ 1e5 to 3.5e5 MACs of a large matmul on the 2-core machines here, so
2e5); on CUDA 5e7 (launch-bound) is an estimate. The model only decides between exact modes, so a
poor value costs speed, never accuracy.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum


class Mode(Enum):
    UNMERGED = "unmerged"  # run on W0 + per-row deltas: the merged copy does not pay off for this batch
    MERGED = "merged"  # every row on the merged weights (others subtract the merged delta when there are any)
    SPLIT = "split"  # the merged rows in their own forward, the rest in another


OP_MACS = {"cpu": 2e5, "cuda": 5e7}  # what one op launch costs, in MACs (see above)
FORWARD_ROWS = {"cpu": 18, "cuda": 256}  # a forward's fixed cost, in rows of the model's MACs (see above)


@dataclass(frozen=True)
class BatchShape:
    merged_rows: int  # token rows of the merged adapter
    other_rows: int  # every other token row, base rows included
    other_spans: int  # contiguous runs of other rows (rows are grouped by slot: at most 2)
    joins_batched: bool = False  # other plain-LoRA rows are in the batch: an unmerged delta adds no ops


@dataclass(frozen=True)
class MergeCost:
    """What the merged adapter costs per row when not merged."""

    row_macs: int  # R = Σ r·(in + out) over its layers (plus out for DoRA / IA3 scaling)
    layers: int  # L: layers with a merged copy
    subtractable: bool  # plain LoRA in every layer: W_merged - W0 = B·A


def choose_mode(shape: BatchShape, cost: MergeCost, forward_macs: float, device_type: str) -> Mode:
    """The cheapest way to run a batch with the merged adapter's rows in it; forward_macs: P, the
    model's multiply-accumulates per row (`engine/step_cost.forward_macs`)."""
    if shape.merged_rows == 0:
        return Mode.UNMERGED
    if shape.other_rows == 0:
        return Mode.MERGED
    c_op = OP_MACS.get(device_type, OP_MACS["cuda"])
    costs = {
        Mode.UNMERGED: shape.merged_rows * cost.row_macs + (0 if shape.joins_batched else 2 * cost.layers * c_op),
        Mode.SPLIT: FORWARD_ROWS.get(device_type, FORWARD_ROWS["cuda"]) * forward_macs,
    }
    if cost.subtractable:
        costs[Mode.MERGED] = shape.other_rows * cost.row_macs + 2 * cost.layers * shape.other_spans * c_op
    return min(costs, key=costs.__getitem__)


class TrafficWindow:
    """Token counts per adapter over roughly the last `window_tokens` tokens, step by step."""

    def __init__(self, window_tokens: int) -> None:
        if window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1, got {window_tokens}")
        self.window = window_tokens
        self.steps: deque[dict[object, int]] = deque()  # one {adapter key (None = base): tokens} per forward
        self.totals: dict[object, int] = {}
        self.total = 0

    def record(self, counts: dict[object, int]) -> None:
        self.steps.append(counts)
        for k, n in counts.items():
            self.totals[k] = self.totals.get(k, 0) + n
            self.total += n
        # drop whole old steps while the rest still fills the window
        while self.steps and self.total - sum(self.steps[0].values()) >= self.window:
            for k, n in self.steps.popleft().items():
                self.totals[k] -= n
                self.total -= n
                if self.totals[k] == 0:
                    del self.totals[k]

    @property
    def judged(self) -> bool:
        """Enough traffic seen to call anything hot or cold."""
        return 2 * self.total >= self.window

    def share(self, key: object) -> float:
        return self.totals.get(key, 0) / self.total if self.total else 0.0

    def hot(self, threshold: float) -> list[object]:
        """Adapter keys (never the base model) whose share reaches `threshold`, hottest first."""
        if not self.judged:
            return []
        keys = [k for k, n in self.totals.items() if k is not None and n >= threshold * self.total]
        return sorted(keys, key=lambda k: -self.totals[k])

    def cold(self, key: object, threshold: float) -> bool:
        return self.judged and self.share(key) < threshold / 2
