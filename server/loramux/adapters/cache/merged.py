"""The merged cache: per (adapter_id, sha256), a merged copy of each layer the adapter changes.

How each layer's merged weight is computed: merged_weights.py.

A merged copy belongs to the device slot its adapter occupies: the layers keep it
per slot, and evicting the slot drops it. Merges run on a worker thread from a
snapshot of the slot's tensors; the copy is attached on the engine thread (`poll`)
only if the slot still holds the same adapter. Until then the adapter's requests
run unmerged, exactly. Every method but `state` runs on the engine thread.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from loramux.adapters.cache.host_tier import Key
from loramux.adapters.cache.merge_policy import BatchShape, MergeCost, Mode, TrafficWindow, choose_mode
from loramux.adapters.cache.merged_weights import Snapshot, merge_all, merge_cost, merged_nbytes
from loramux.adapters.kinds.base import AdapterError, LoadedAdapter
from loramux.adapters.kinds.lora import MergedWeight
from loramux.adapters.model.wrapped import WrappedModel
from loramux.engine.step_cost import forward_macs

if TYPE_CHECKING:
    from loramux.engine.request import Request

log = logging.getLogger("loramux.adapters")


@dataclass
class MergedEntry:
    key: Key
    slot: int  # the device slot whose adapter was merged
    adapter: LoadedAdapter  # that slot's device copy; the merge is attached only if the slot still holds it
    nbytes: int  # bytes of the merged copies (estimated until ready)
    auto: bool  # merged by the hot policy (it may also unmerge it), not by LoadAdapter(merge=true)
    cost: MergeCost
    job: Future | None = None  # the worker's merge, until attached
    layers: dict[str, MergedWeight] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> bool:
        return self.job is None


class MergedCache:
    def __init__(
        self,
        wrapped: WrappedModel,
        slots: list[Any],  # AdapterCache.slots: .key, .adapter, .pinned per device slot (read only)
        budget_bytes: int,
        threshold: float,
        window_tokens: int,
        metrics: Any = None,
        on_ready: Any = None,
    ) -> None:
        self.wrapped = wrapped
        self.slots = slots
        self.budget = budget_bytes
        self.threshold = threshold
        self.metrics = metrics
        self.on_ready = on_ready or (lambda: None)
        self.entries: dict[Key, MergedEntry] = {}
        self.traffic = TrafficWindow(window_tokens)
        self.forward_macs = forward_macs(wrapped.model)  # P, one row's MACs (merge_policy.choose_mode)
        self._refused: set[Key] = set()  # hot adapters that did not fit: not retried every step
        self._worker: ThreadPoolExecutor | None = None

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    # --- per batch (engine thread) ---
    def observe(self, requests: list[Request]) -> None:
        """Count this forward's tokens per adapter; merge what became hot, unmerge what went cold."""
        counts: dict[object, int] = {}
        for r in requests:
            key = r.adapter_handle.key if r.adapter_handle is not None else None
            counts[key] = counts.get(key, 0) + _rows(r)
        self.traffic.record(counts)
        for key in self.traffic.hot(self.threshold):
            if key in self.entries or key in self._refused:
                continue
            slot = next((r.adapter_slot for r in requests if r.adapter_handle is not None
                         and r.adapter_handle.key == key), None)  # fmt: skip
            adapter = self.slots[slot].adapter if slot is not None else None
            if adapter is None or not adapter.info.mergeable:
                self._refused.add(key)
                continue
            log.info(
                "merge policy: adapter %s has %.0f%% of the last %d tokens (threshold %.0f%%): merging",
                key[0],
                100 * self.traffic.share(key),
                self.traffic.total,
                100 * self.threshold,
            )
            try:
                self.merge(key, slot, auto=True)
            except ValueError as e:
                log.info("merge policy: not merging adapter %s: %s", key[0], e)
                self._refused.add(key)
        for e in [e for e in self.entries.values() if e.auto and e.ready and not self._pinned(e)]:
            if self.traffic.cold(e.key, self.threshold):
                log.info(
                    "merge policy: adapter %s fell to %.0f%% of recent tokens: unmerging",
                    e.key[0],
                    100 * self.traffic.share(e.key),
                )
                self.drop(e.key, "unmerge")

    def plan(self, requests: list[Request]) -> tuple[int, bool]:
        """(merged slot or -1, split) for this batch; see merge_policy.choose_mode."""
        self.poll()
        rows: dict[int, int] = {}
        for r in requests:
            rows[r.adapter_slot] = rows.get(r.adapter_slot, 0) + _rows(r)
        ready = [e for e in self.entries.values() if e.ready and e.slot in rows]
        if not ready:
            return -1, False
        e = max(ready, key=lambda e: rows[e.slot])
        merged_rows = rows[e.slot]
        others = sum(rows.values()) - merged_rows
        adapters = sum(n for slot, n in rows.items() if slot not in (-1, e.slot))  # other adapters' rows
        # the runner puts merged rows last: one span of others
        shape = BatchShape(merged_rows, others, 1 if others else 0, joins_batched=adapters > 0 and e.cost.subtractable)
        mode = choose_mode(shape, e.cost, self.forward_macs, self.wrapped.device.type)
        if mode is Mode.UNMERGED:
            return -1, False
        e.last_used = time.monotonic()
        return e.slot, mode is Mode.SPLIT

    # --- merging (engine thread) ---
    def merge(self, key: Key, slot: int, auto: bool = False) -> bool:
        """Start merging the adapter in `slot` (if not yet); True once its merged copy is in use."""
        self.poll()
        entry = self.entries.get(key)
        if entry is not None:
            entry.auto = entry.auto and auto  # an explicit merge is never undone by the policy
            return entry.ready
        if not self.enabled:
            raise ValueError("the merged cache is off (--merged-cache-mb 0)")
        adapter = self.slots[slot].adapter
        if adapter is None or self.slots[slot].key != key:
            raise ValueError(f"adapter {key[0]} is not in device slot {slot}")
        if not adapter.info.mergeable:
            raise AdapterError(
                f"adapter {key[0]}: {adapter.info.adapter_type} adapters cannot be merged "
                "(only LoRA, DoRA and IA3 change weights)"
            )
        layers = {n: lay for n, lay in self.wrapped.linears.items() if lay.deltas[slot] is not None}
        nbytes = sum(merged_nbytes(lay, slot) for lay in layers.values())
        self._make_room(key[0], nbytes)
        snapshot: Snapshot = [
            (n, replace(lay.parts(slot)), lay.base_weight_rows(), lay.bias) for n, lay in layers.items()
        ]
        entry = MergedEntry(key, slot, adapter, nbytes, auto, merge_cost(layers.values(), slot))
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-merge")
        entry.job = self._worker.submit(merge_all, snapshot, self.wrapped.dtype)
        entry.job.add_done_callback(lambda _f: self.on_ready())
        self.entries[key] = entry
        if self.metrics is not None:
            self.metrics.merge_decision("merge")
        log.info(
            "merging adapter %s (slot %d, %d layers, %.1f MB)%s",
            key[0],
            slot,
            len(layers),
            nbytes / 2**20,
            " [auto]" if auto else "",
        )
        return False

    def poll(self) -> None:
        """Attach finished merges whose slot still holds the adapter they were made from."""
        for e in [e for e in self.entries.values() if e.job is not None and e.job.done()]:
            try:
                layers: dict[str, MergedWeight] = e.job.result()
            except Exception as err:
                log.warning("merging adapter %s failed: %s", e.key[0], err)
                self.drop(e.key, None)
                continue
            slot = self.slots[e.slot]
            if slot.key != e.key or slot.adapter is not e.adapter:
                self.drop(e.key, None)  # evicted or overwritten while merging
                continue
            for name, mw in layers.items():
                self.wrapped.linears[name].set_merged(e.slot, mw)
            e.layers, e.job = layers, None
            e.nbytes = sum(mw.nbytes for mw in layers.values())
            seconds = time.perf_counter() - e.started
            if self.metrics is not None:
                self.metrics.adapter_load("merged", seconds)
            log.info("adapter %s merged in %.3fs: its batches now run on merged weights", e.key[0], seconds)
            self._publish()

    def drop(self, key: Key, action: str | None) -> None:
        """Forget `key`'s merged copy (action: the metric's merge decision, or None for no decision)."""
        e = self.entries.pop(key, None)
        if e is None:
            return
        if e.job is not None:
            e.job.cancel()
        for name in e.layers:
            self.wrapped.linears[name].clear_merged(e.slot)
        self._refused.discard(key)
        if action is not None and self.metrics is not None:
            self.metrics.merge_decision(action)
            if action == "evict":
                self.metrics.eviction("merged")
        if e.ready:
            log.info("adapter %s unmerged (%s)", key[0], action or "stale")
        self._publish()

    def drop_slot(self, slot: int) -> None:
        """The device slot was evicted: its merged copy goes with it."""
        for e in [e for e in self.entries.values() if e.slot == slot]:
            self.drop(e.key, "evict")

    def forget(self, adapter_id: str, current_sha: str | None) -> None:
        """After an overwrite or delete: drop merged copies of weights that are no longer current."""
        for key in [k for k in self.entries if k[0] == adapter_id and k[1] != current_sha]:
            self.drop(key, None)
        self._refused = {k for k in self._refused if k[0] != adapter_id}

    # --- views (any thread) ---
    def state(self, key: Key) -> bool:
        e = self.entries.get(key)
        return e is not None and e.ready

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)

    # --- internals ---
    def _pinned(self, e: MergedEntry) -> bool:
        return bool(self.slots[e.slot].pinned)

    def _make_room(self, adapter_id: str, nbytes: int) -> None:
        """Evict least recently used, unpinned merged copies until `nbytes` more fit; ValueError if they cannot."""
        if nbytes > self.budget:
            raise ValueError(
                f"adapter {adapter_id}: its merged weights need {nbytes / 2**20:.1f} MB, more than "
                f"--merged-cache-mb ({self.budget / 2**20:.1f} MB)"
            )
        used = sum(e.nbytes for e in self.entries.values())
        victims = sorted(
            (e for e in self.entries.values() if e.ready and not self._pinned(e)), key=lambda e: e.last_used
        )
        freeable = sum(e.nbytes for e in victims)
        if used - freeable + nbytes > self.budget:
            raise ValueError(
                f"adapter {adapter_id}: no room in the merged cache ({self.budget / 2**20:.1f} MB); "
                "pinned merged adapters or merges in progress hold it"
            )
        for e in victims:
            if used + nbytes <= self.budget:
                break
            log.info("merged cache full: evicting adapter %s (least recently used)", e.key[0])
            used -= e.nbytes
            self.drop(e.key, "evict")

    def _publish(self) -> None:
        if self.metrics is not None:
            ready = [e for e in self.entries.values() if e.ready]
            self.metrics.set_resident("merged", len(ready), sum(e.nbytes for e in ready))


def _rows(r: Request) -> int:
    """Token rows a request adds to this forward (soft-prompted requests count their virtual tokens)."""
    return max(1, getattr(r, "seq_len", r.total_len) - r.num_computed)
