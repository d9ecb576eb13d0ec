"""The one per-forward context: attention metadata, adapter segments, the LoRA path.

The runner builds one `AdapterContext` before each forward and sets it on the
model's `ContextHolder`; every wrapped layer holds a reference to that holder.
Nothing is threaded through `forward` signatures and no hooks are added per call.
Attention modules hold a reference to the same holder (engine/attention.py) and
read the attention metadata from it.

Token rows are flat: the model runs on `input_ids` of shape [1, tokens], so a
layer sees `x: [1, tokens, hidden]` and flattens it to `[tokens, hidden]`. The
runner orders rows so that rows sharing an adapter slot are contiguous; each
contiguous run is one segment.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from loramux.config import LORA_PATHS  # noqa: F401 (re-exported: the LoRA paths, adapters/kinds/lora_batched.py)

if TYPE_CHECKING:
    from loramux.engine.attention import AttentionMeta

BASE_SLOT = -1


@dataclass(frozen=True)
class Segment:
    start: int  # first token row
    end: int  # one past the last token row
    slot: int  # device slot, BASE_SLOT for the base model


@dataclass
class AdapterContext:
    # slots: [tokens] int64 on the model's device, each row's device slot (BASE_SLOT = base model);
    # None until the runner's one copy of the forward's indices has run (engine/runner.py)
    slots: torch.Tensor | None
    # contiguous runs of rows with the same slot, in row order, covering every row
    segments: list[Segment]
    # slot whose merged weights replace W0 for this forward (BASE_SLOT = none)
    merged_slot: int = BASE_SLOT
    # the LoRA path of this forward, one of LORA_PATHS
    lora_path: str = "auto"
    # what attention needs (cache rows, positions, masks); None for forwards without the KV cache (tests)
    attention: AttentionMeta | None = None
    # an all-merged forward on the compiled path (engine/compiled.py): every wrapped layer's weight,
    # by the layer's `index` (its merged copy, or W0 where the adapter leaves it alone); None otherwise
    merged_weights: list[Any] | None = None
    # a compiled adapter step (engine/compiled.py): every wrapped layer applies its adapter deltas
    # through one opaque operator call (adapters/model/adapter_op.py) instead of tracing them
    opaque_adapters: bool = False
    # the segments whose slot is an adapter (not BASE_SLOT), precomputed once
    adapter_segments: list[Segment] = field(init=False)
    # with a merged slot: the adapter segments of the other slots, and the (start, end) row spans of
    # every row not in the merged slot, base rows included (they undo the merged delta, see adapters/model/linear.py)
    other_adapter_segments: list[Segment] = field(init=False)
    other_spans: list[tuple[int, int]] = field(init=False)
    # per-forward values that every layer shares, built by the first layer that asks (see `memo`)
    _memo: dict[Hashable, Any] = field(init=False, repr=False, default_factory=dict)

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """`build()` once per forward per key; later calls (other layers) get the same value.

        Batched LoRA keeps its plans here (lora_batched.py): built once per forward, their index
        tensors copied with the runner's one copy, instead of once per wrapped layer.
        """
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def __post_init__(self) -> None:
        if self.lora_path not in LORA_PATHS:
            raise ValueError(f"lora_path must be one of {LORA_PATHS}, got {self.lora_path!r}")
        self.adapter_segments = [s for s in self.segments if s.slot != BASE_SLOT]
        self.other_adapter_segments, self.other_spans = [], []
        if self.merged_slot != BASE_SLOT:
            self.other_adapter_segments = [s for s in self.adapter_segments if s.slot != self.merged_slot]
            for s in self.segments:
                if s.slot == self.merged_slot:
                    continue
                if self.other_spans and self.other_spans[-1][1] == s.start:
                    self.other_spans[-1] = (self.other_spans[-1][0], s.end)
                else:
                    self.other_spans.append((s.start, s.end))

    @property
    def num_tokens(self) -> int:
        return self.segments[-1].end if self.segments else 0

    @staticmethod
    def from_row_slots(
        row_slots: list[int],
        device: torch.device,
        merged_slot: int = BASE_SLOT,
        lora_path: str = "auto",
        attention: AttentionMeta | None = None,
    ) -> AdapterContext:
        """Build the context from each token row's slot (rows already grouped by slot), with its own
        copy of the slots to the device (the runner instead copies all of a forward's indices at once)."""
        slots = torch.tensor(row_slots, dtype=torch.long, device=device)
        return AdapterContext(slots, row_segments(row_slots), merged_slot, lora_path, attention)


def row_segments(row_slots: list[int]) -> list[Segment]:
    """The contiguous runs of equal slots in `row_slots`, in row order."""
    segments: list[Segment] = []
    start = 0
    for i in range(1, len(row_slots) + 1):
        if i == len(row_slots) or row_slots[i] != row_slots[start]:
            segments.append(Segment(start, i, row_slots[start]))
            start = i
    return segments


def to_device(parts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Int lists as int64 tensors on `device`, through one host buffer and one copy.

    On CUDA the buffer is pinned and the copy asynchronous (non_blocking): the host goes on
    building the step while it runs, and no layer waits for it but on the device's own stream.
    """
    flat = [v for part in parts for v in part]
    host = torch.tensor(flat, dtype=torch.long)
    if device.type == "cuda":
        host = host.pin_memory()
        out = host.to(device, non_blocking=True)
    else:
        out = host
    return list(out.split([len(part) for part in parts]))


class ContextHolder:
    """One per wrapped model: the runner sets the context, the layers read it."""

    def __init__(self) -> None:
        self.ctx: AdapterContext | None = None

    def set(self, ctx: AdapterContext | None) -> None:
        self.ctx = ctx

    def get(self) -> AdapterContext | None:
        return self.ctx
