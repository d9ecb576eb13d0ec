"""The scheduler: iteration-level batching with token, row and adapter-slot budgets.

Every step it drops what was cancelled or expired, admits waiting requests in
arrival order while the budgets allow, and returns one `Batch`: the new prompts
to prefill and every running request's next token. A request joins at the step
after it arrives and leaves the step it finishes.

Fairness with adapter slots: when the oldest request that needs an adapter cannot
get a device slot (all are held by running requests), the cache reserves the slot
that frees soonest (it takes no new requests). Later requests may pass the waiting
one only when their adapter is already resident in another slot; none may load an
adapter past it. The reserved slot's requests finish, the oldest request claims it:
no starvation, and no deadlock since a running request never waits for a slot.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from loramux.config import EngineConfig
from loramux.engine.kv_cache import KVCache
from loramux.engine.request import Request, Status
from loramux.engine.runner import Batch


class QueueFull(Exception):
    """The waiting queue is at --max-queue."""


class SlotLease(Protocol):
    slot: int


class AdapterSlots(Protocol):
    """What the scheduler needs from the adapter cache."""

    def acquire(self, adapter_id: str, may_load: bool = True) -> SlotLease | None:
        """A lease on a ready device slot, or None while it loads or waits for a slot. Raises on bad adapters.

        may_load=False: lease only if already resident (load, evict or reserve nothing)."""

    def waiting_for_slot(self, adapter_id: str) -> bool:
        """True when `adapter_id` is not loading because every slot is held."""

    def still_wanted(self, adapter_ids: set[str]) -> None:
        """The adapters of every waiting request: a slot reserved for any other adapter is freed."""

    def release(self, lease: SlotLease) -> None: ...

    def merge_plan(self, requests: list[Request]) -> tuple[int, bool]:
        """(the slot whose merged weights this batch runs on, -1: none; whether its rows run in a forward
        of their own)."""


class Scheduler:
    def __init__(self, config: EngineConfig, cache: KVCache, adapters: AdapterSlots | None) -> None:
        self.config = config
        self.cache = cache
        self.adapters = adapters
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Positions a slot's soft prompt adds in front of a prompt (the engine points it at the runner).
        self.virtual_tokens: Callable[[int], int] = lambda slot: 0

    def reap(self, on_dropped: Callable[[Request, str], None]) -> None:
        """Drop cancelled and expired requests, freeing their KV rows and slots at once."""
        now = time.monotonic()
        for queue in (self.waiting, self.running):
            for r in [r for r in queue if r.cancelled or r.expired(now)]:
                queue.remove(r)
                self.free(r)
                on_dropped(r, "cancelled" if r.cancelled else "deadline")

    def fail_waiting(self, fail: Callable[[Request, BaseException], None]) -> None:
        """Fail every waiting request (shutdown)."""
        while self.waiting:
            fail(self.waiting.popleft(), RuntimeError("server shutting down"))

    def schedule(self, on_error: Callable[[Request, BaseException], None]) -> Batch:
        budget = self.config.max_batch_tokens - len(self.running)
        admitted: list[Request] = []
        if self.adapters is not None:  # a reservation whose requests are gone must not hold a slot
            self.adapters.still_wanted({r.adapter_id for r in self.waiting if r.adapter_id})
        slot_blocked = False
        for r in list(self.waiting):
            if len(self.running) + len(admitted) >= self.config.max_running or self.cache.free_rows == 0:
                break
            if admitted and r.prompt_len > budget:
                break  # arrival order: a later, shorter prompt does not pass this one
            if r.adapter_id:
                if self.adapters is None:
                    continue
                try:
                    lease = self.adapters.acquire(r.adapter_id, may_load=not slot_blocked)
                except Exception as e:  # a bad or vanished adapter fails this request only
                    self.waiting.remove(r)
                    on_error(r, e)
                    continue
                if lease is None:
                    slot_blocked = slot_blocked or self.adapters.waiting_for_slot(r.adapter_id)
                    continue
                r.adapter_handle = lease
                r.adapter_slot = lease.slot
                # A soft prompt's virtual tokens count like prompt tokens (budget, context).
                r.num_virtual = self.virtual_tokens(lease.slot)
                if r.num_virtual and (err := self._too_long(r)) is not None:
                    self._unlease(r)
                    self.waiting.remove(r)
                    on_error(r, err)
                    continue
                if admitted and r.num_virtual + r.prompt_len > budget:
                    self._unlease(r)
                    break
            self.waiting.remove(r)
            r.kv_slot = self.cache.allocate()
            r.status = Status.RUNNING
            r.first_scheduled = time.monotonic()
            admitted.append(r)
            budget -= r.num_virtual + r.prompt_len
        batch = Batch(prefill=admitted, decode=list(self.running))
        self.running.extend(admitted)
        if self.adapters is not None and batch.requests:
            batch.merged_slot, batch.split_merged = self.adapters.merge_plan(batch.requests)
        return batch

    def _unlease(self, r: Request) -> None:
        if r.adapter_handle is not None and self.adapters is not None:
            self.adapters.release(r.adapter_handle)
        r.adapter_handle, r.adapter_slot, r.num_virtual = None, -1, 0

    def _too_long(self, r: Request) -> ValueError | None:
        """A soft-prompted request is checked against the context once its virtual tokens are known."""
        if r.num_virtual + r.prompt_len + r.params.max_new_tokens <= self.cache.max_len:
            return None
        return ValueError(
            f"prompt ({r.prompt_len} tokens) + the adapter's {r.num_virtual} virtual tokens + max_new_tokens "
            f"({r.params.max_new_tokens}) exceeds the model's context of {self.cache.max_len} tokens"
        )

    def finish(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        self.free(req)

    def free(self, req: Request) -> None:
        req.status = Status.FINISHED
        self.cache.release(req.kv_slot)
        req.kv_slot = -1
        if req.adapter_handle is not None and self.adapters is not None:
            self.adapters.release(req.adapter_handle)
        req.adapter_handle = None

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running
