"""The tiered adapter cache: store (disk) -> host memory (LRU, bytes) -> device slots (LRU).

Keys are (adapter_id, sha256 of the weights), so a re-upload under the same id is
a different key and no tier can serve the old weights to a request admitted after
it. Parsing and host->device copies run on a worker thread; only `install` (which
points the wrapped layers at the slot's tensors) runs on the engine thread,
between forwards. Every method except `state`/`resident` is called on the engine
thread, so the slot table needs no lock.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from loramux.adapters.cache.host_tier import HostTier, Key
from loramux.adapters.cache.load_job import LoadResult, Stale, load
from loramux.adapters.cache.merged import MergedCache
from loramux.adapters.cache.reservations import Reservations
from loramux.adapters.cache.slot import Lease, Slot
from loramux.adapters.model.wrapped import WrappedModel
from loramux.adapters.store.store import AdapterStore

if TYPE_CHECKING:
    from loramux.engine.request import Request

log = logging.getLogger("loramux.adapters")


class SlotsPinned(Exception):
    """Every device slot is pinned to another adapter: none can ever free up (RESOURCE_EXHAUSTED)."""


class AdapterCache:
    def __init__(
        self,
        wrapped: WrappedModel,
        store: AdapterStore,
        host_cache_bytes: int,
        metrics: Any = None,
        on_ready: Any = None,
        merged_cache_bytes: int = 0,
        merge_threshold: float = 0.5,
        merge_window_tokens: int = 4096,
    ) -> None:
        self.wrapped = wrapped
        self.store = store
        self.metrics = metrics
        self.on_ready = on_ready or (lambda: None)
        self.slots = [Slot(i) for i in range(wrapped.num_slots)]
        self.host = HostTier(host_cache_bytes, metrics)
        self.errors: dict[Key, BaseException] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-adapter-load")
        # who waits for a slot, and the slot reserved for them (reservations.py)
        self.reservations = Reservations(self.slots)
        # the merged tier (merged.py): merged W0 + delta copies of hot adapters' weights, per device slot
        self.merged = MergedCache(
            wrapped,
            self.slots,
            merged_cache_bytes,
            merge_threshold,
            merge_window_tokens,
            metrics,
            on_ready=lambda: self.on_ready(),
        )
        self._publish()

    # --- scheduler interface (engine thread) ---
    def acquire(self, adapter_id: str, may_load: bool = True) -> Lease | None:
        """A lease on a ready slot, or None while it loads or waits for a slot; raises on bad adapters.

        With `may_load=False` only an adapter already resident is leased: nothing is
        loaded, evicted or reserved (the scheduler's way to let requests pass an older
        one that waits for a slot, without taking that slot from it).
        """
        record = self.store.get(adapter_id)  # AdapterNotFound for unknown or deleted ids
        key = (adapter_id, record.sha256)
        if key in self.errors:
            raise self.errors.pop(key)
        slot = self._slot_for(key)
        if slot is not None and slot.loading is not None:
            if not slot.loading.done():
                return None
            if not self._finish_load(slot):
                return self.acquire(adapter_id)  # the load failed or raced an overwrite: try again
        if slot is not None:
            if slot.draining and self.reservations.owner_alive(slot):
                return None  # being freed for an older request; this one loads again afterwards
            slot.reserved_for = None  # (a lapsed reservation)
            self.reservations.unreserve(adapter_id)  # it has a slot: it needs no other
            if self.metrics is not None:
                self.metrics.cache_hit("device")
            return self._lease(slot)
        if not may_load:
            return None
        self.reservations.blocked.discard(adapter_id)
        if self.metrics is not None:
            self.metrics.cache_miss("device")
        free = self._claim_slot()
        if free is None:
            if all(s.pinned for s in self.slots):
                raise SlotsPinned(
                    f"every device slot ({len(self.slots)}) is pinned to another adapter, so adapter "
                    f"{adapter_id[:128]!r} cannot be loaded; unpin one (UnloadAdapter) first"
                )
            self.reservations.wait(adapter_id)
            return None
        self.reservations.unreserve(adapter_id)  # it got a slot: a reservation it made elsewhere lapses
        free.key = key
        free.loading = self._worker.submit(load, key, self.host, self.store, self.wrapped)
        free.loading.add_done_callback(lambda _f: self.on_ready())
        return None

    def waiting_for_slot(self, adapter_id: str) -> bool:
        return self.reservations.waiting_for_slot(adapter_id)

    def still_wanted(self, adapter_ids: set[str]) -> None:
        """The adapters of every waiting request (the scheduler, each step): reservations and
        waits of any other adapter (its requests were cancelled, expired or failed) lapse now."""
        self.reservations.still_wanted(adapter_ids)

    def release(self, lease: Lease) -> None:
        slot = self.slots[lease.slot]
        slot.refs -= 1
        slot.last_used = time.monotonic()
        if slot.refs == 0 and not self._current(slot):
            self._evict(slot)  # overwritten or deleted: drop the old weights now

    def merge_plan(self, requests: list[Request]) -> tuple[int, bool]:
        """(slot whose merged weights this batch runs on or -1, whether its rows run in a forward of their own).

        One call per batch, which also feeds the hot-adapter policy (merge_policy.choose_mode decides the split).
        """
        if not self.merged.enabled:
            return -1, False
        self.merged.observe(requests)
        return self.merged.plan(requests)

    # --- explicit control (engine thread, via Engine.call) ---
    def prefetch(self, adapter_id: str, pin: bool) -> bool:
        """Start loading (and pin or unpin); True once resident. Until then (or `end_prefetch`)
        the adapter counts as wanted, so a slot reservation it makes holds."""
        self.reservations.prefetching.add(adapter_id)
        key = (adapter_id, self.store.get(adapter_id).sha256)
        slot = self._slot_for(key)
        if pin and slot is not None and slot.draining:
            slot.reserved_for = None  # a pinned slot can never be claimed: the pin wins, the waiter re-reserves
        try:
            lease = self.acquire(adapter_id)
        except BaseException:
            self.reservations.prefetching.discard(adapter_id)
            raise
        slot = self._slot_for(key)
        if slot is not None:
            slot.pinned = pin or slot.pinned
        if lease is None:
            return False
        self.reservations.prefetching.discard(adapter_id)
        self.release(lease)
        return True

    def end_prefetch(self, adapter_id: str) -> None:
        """The LoadAdapter call for `adapter_id` is over (answered, failed or gone)."""
        self.reservations.end_prefetch(adapter_id)

    def merge(self, adapter_id: str, pin: bool = True) -> bool:
        """LoadAdapter(merge=true): load into a device slot (pinned with `pin`) and merge; True once merged.

        Only starts the work: call again (through Engine.call) until True. ValueError when the merged
        cache is off, the adapter cannot be merged (bottleneck, soft prompt) or does not fit the budget.
        A merged copy is pinned exactly while its device slot is."""
        if not self.merged.enabled:
            raise ValueError("the merged cache is off (--merged-cache-mb 0)")
        if not self.prefetch(adapter_id, pin):
            return False
        key = (adapter_id, self.store.get(adapter_id).sha256)
        slot = self._slot_for(key)
        return slot is not None and self.merged.merge(key, slot.index)

    def unmerge(self, adapter_id: str) -> None:
        """Drop `adapter_id`'s merged copies; it keeps serving, unmerged, from its slot."""
        for key in [k for k in self.merged.entries if k[0] == adapter_id]:
            self.merged.drop(key, "unmerge")

    def unpin(self, adapter_id: str) -> None:
        for slot in self.slots:
            if slot.key is not None and slot.key[0] == adapter_id:
                slot.pinned = False

    def unload(self, adapter_id: str) -> None:
        """Unpin `adapter_id` and free its idle device slots; the host copy stays (UnloadAdapter)."""
        self.unmerge(adapter_id)  # at once: requests still running on it go on unmerged
        for slot in self.slots:
            if slot.key is not None and slot.key[0] == adapter_id:
                slot.pinned = False
                if slot.refs == 0 and slot.loading is None:
                    self._evict(slot)  # a slot that running requests hold is freed by LRU later

    def forget(self, adapter_id: str) -> None:
        """Drop every unused tier entry of `adapter_id` (after an overwrite or delete)."""
        self.host.drop(adapter_id)
        try:
            self.merged.forget(adapter_id, self.store.get(adapter_id).sha256)
        except KeyError:  # deleted
            self.merged.forget(adapter_id, None)
        for slot in self.slots:
            if slot.key is not None and slot.key[0] == adapter_id and slot.refs == 0 and slot.loading is None:
                if not self._current(slot):
                    self._evict(slot)
        self._publish()

    # --- views (any thread; snapshots) ---
    def state(self, adapter_id: str, sha256: str) -> tuple[str, bool]:
        """(tier, pinned) of the current weights: 'merged', 'device', 'host' or 'stored'."""
        key = (adapter_id, sha256)
        for slot in list(self.slots):
            if slot.key == key and slot.adapter is not None:
                return ("merged" if self.merged.state(key) else "device"), slot.pinned
        return ("host" if key in self.host else "stored"), False

    @property
    def free_slots(self) -> int:
        return sum(1 for s in self.slots if s.key is None)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        self.merged.close()

    # --- internals ---
    def _lease(self, slot: Slot) -> Lease:
        slot.refs += 1
        slot.last_used = time.monotonic()
        return Lease(slot.index, slot.key)

    def _slot_for(self, key: Key) -> Slot | None:
        for slot in self.slots:
            if slot.key == key:
                return slot
        return None

    def _current(self, slot: Slot) -> bool:
        if slot.key is None:
            return False
        try:
            return self.store.get(slot.key[0]).sha256 == slot.key[1]
        except KeyError:
            return False

    def _claim_slot(self) -> Slot | None:
        """A free slot, or the reserved or least recently used one that nothing holds (evicted)."""
        free = [s for s in self.slots if s.key is None]
        if free:
            return free[0]
        idle = [s for s in self.slots if not s.busy]
        if not idle:
            return None
        victim = min(idle, key=lambda s: (not s.draining, s.last_used))
        self._evict(victim)
        return victim

    def _evict(self, slot: Slot) -> None:
        self.merged.drop_slot(slot.index)
        if slot.adapter is not None:
            slot.adapter.uninstall(self.wrapped, slot.index)
            if self.metrics is not None:
                self.metrics.eviction("device")
            log.info("evicted adapter %s from device slot %d", slot.key[0], slot.index)
        slot.key, slot.adapter, slot.loading, slot.refs, slot.pinned = None, None, None, 0, False
        slot.reserved_for = None
        self._publish()

    def _finish_load(self, slot: Slot) -> bool:
        """Engine thread: install a finished load; False when it failed (slot freed)."""
        fut, key = slot.loading, slot.key
        slot.loading = None
        try:
            result: LoadResult = fut.result()
        except Stale:
            self._evict(slot)
            return False
        except Exception as e:
            log.warning("adapter %s failed to load: %s", key[0], e)
            self.errors[key] = e
            self._evict(slot)
            return False
        result.adapter.install(self.wrapped, slot.index)
        slot.adapter = result.adapter
        if result.host_copy is not None:
            self.host.put(key, result.host_copy)
        if self.metrics is not None:
            self.metrics.adapter_load(result.tier, result.seconds)
            if result.tier == "host":
                self.metrics.cache_hit("host")
            else:
                self.metrics.cache_miss("host")
        log.info(
            "adapter %s loaded into device slot %d from %s in %.3fs", key[0], slot.index, result.tier, result.seconds
        )
        self._publish()
        return True

    def _publish(self) -> None:
        if self.metrics is None:
            return
        on_device = [s for s in self.slots if s.adapter is not None]
        # device bytes: the adapters' device copies plus the layers' LoRA stacks as allocated (lora_stacks.py)
        device_bytes = sum(s.adapter.nbytes() for s in on_device) + self.wrapped.lora_stack_nbytes()
        self.metrics.set_resident("device", len(on_device), device_bytes)
        self.metrics.set_resident("host", len(self.host), self.host.nbytes)
        self.metrics.set_slots_free(self.free_slots)
        stored = self.store.list()  # the store tier: every published adapter (bytes = weights files)
        self.metrics.set_resident("store", len(stored), sum(r.size for r in stored))
