"""The scheduler: iteration-level batching with token, KV-block and adapter-slot budgets.

Every step it drops what was cancelled or expired, then fills one step's budget
(`--max-batch-tokens`): every running decode gets its token; what is left of the
budget goes to the next chunks of prompts still being prefilled, oldest first, then to
waiting requests in arrival order. A prompt longer than what is left is prefilled in
chunks over several steps beside the running decodes. A decode counts one token, a
prompt chunk its cost (step_cost.py: n tokens after c positions cost
n + n·(c + (n+1)/2)/K + c/G), so a chunk deep into a long prompt gets fewer tokens than
its first one and every step that carries a chunk costs about the same (the streams
decoding beside it keep an even pace). The step's first chunk gets at least one block's
worth whatever is left, so prompts always progress. A request joins at the step after
it arrives and leaves the step it finishes.

KV blocks: a request gets blocks for the positions it computes this step, after
reusing the cached blocks of its longest prefix chain (prefix_cache.py). When a
running request needs a block and none is free, the newest running request is
preempted: its blocks go back to the pool, it returns to the front of the queue
keeping its output and adapter lease, and is recomputed (prompt + output as one
prefill, often from its own cached blocks) when blocks free up. Sampling resumes
exactly where it stopped, so a preemption changes no output. Waiting requests are
admitted only while no request was preempted in the step and blocks are free. The
pool holds at least one `--max-model-len` request (checked at start), so the oldest
request always progresses.

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
from loramux.engine.kv_blocks import BlockPool
from loramux.engine.prefix_cache import PrefixCache
from loramux.engine.request import InvalidParameter, Request, Status
from loramux.engine.runner import Batch
from loramux.engine.step_cost import StepCost


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


class SchedulerMetrics(Protocol):
    def preempted(self) -> None: ...

    def prefix_query(self, tokens: int, hits: int) -> None: ...


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        pool: BlockPool,
        adapters: AdapterSlots | None,
        *,
        max_len: int,
        batch_tokens: int,
        prefix: PrefixCache | None = None,
        metrics: SchedulerMetrics | None = None,
        cost: StepCost | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.prefix = prefix or PrefixCache(pool, enabled=False)
        self.adapters = adapters
        self.max_len = max_len
        self.batch_tokens = batch_tokens
        self.cost = cost or StepCost()  # what a token costs the step's budget (default: 1, plain token counts)
        self.metrics = metrics
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the newest is last (preempted first)
        self.preemptions = 0
        # Positions a slot's soft prompt adds in front of a prompt (the engine points it at the runner).
        self.virtual_tokens: Callable[[int], int] = lambda slot: 0

    def reap(self, on_dropped: Callable[[Request, str], None]) -> None:
        """Drop cancelled and expired requests, freeing their KV blocks and slots at once."""
        now = time.monotonic()
        for queue in (self.waiting, self.running):
            for r in [r for r in queue if r.cancelled or r.expired(now)]:
                queue.remove(r)
                self.free(r)
                on_dropped(r, "cancelled" if r.cancelled else "deadline")

    def fail_waiting(self, fail: Callable[[Request, BaseException], None]) -> None:
        """Fail every waiting request (shutdown)."""
        while self.waiting:
            r = self.waiting.popleft()
            self.free(r)
            fail(r, RuntimeError("server shutting down"))

    def schedule(self, on_error: Callable[[Request, BaseException], None]) -> Batch:
        if self.adapters is not None:  # a reservation whose requests are gone must not hold a slot
            self.adapters.still_wanted({r.adapter_id for r in self.waiting if r.adapter_id})
        # Every decode runs; prompt chunks share what is left of the budget (in costs, step_cost.py),
        # the first of them at least one block's worth of tokens, so that prompts always progress.
        decodes = sum(r.seq_len - r.num_computed == 1 for r in self.running)
        step = _Budget(self.batch_tokens - decodes, self.pool.block_size)
        scheduled: list[Request] = []
        preempted_before = self.preemptions
        for r in list(self.running):  # oldest first
            if r.status is not Status.RUNNING:
                continue  # preempted for an older one in this loop
            last = r.seq_len - r.num_computed == 1  # a decode (or a prompt's last position): in `decodes`
            n = 1 if last else self._chunk(r, r.num_computed, step)
            if n == 0:  # its next chunk waits for a step with budget left, and no later prompt passes it
                step.left = 0.0
                continue
            if not self._grow(r, r.num_computed + n):
                break  # r itself was the newest: it waits with the ones preempted before it
            if not last:
                step.spend(self.cost.chunk(r.num_computed, n))
            r.num_scheduled = n
            scheduled.append(r)
        if self.preemptions == preempted_before:
            self._admit(step, scheduled, on_error)
        decode = [r for r in scheduled if _is_decode(r)]
        batch = Batch(prefill=[r for r in scheduled if not _is_decode(r)], decode=decode)
        if self.adapters is not None and batch.requests:
            batch.merged_slot, batch.split_merged = self.adapters.merge_plan(batch.requests)
        return batch

    def _admit(
        self, step: _Budget, scheduled: list[Request], on_error: Callable[[Request, BaseException], None]
    ) -> None:
        """Admit waiting requests in arrival order while tokens, blocks, rows and slots allow."""
        slot_blocked = False
        for r in list(self.waiting):
            if step.exhausted or len(self.running) >= self.config.max_running:
                break
            if r.adapter_id and r.adapter_handle is None:
                if self.adapters is None:
                    continue
                try:
                    lease = self.adapters.acquire(r.adapter_id, may_load=not slot_blocked)
                except Exception as e:  # a bad or vanished adapter fails this request only
                    self.waiting.remove(r)
                    on_error(r, e)
                    # its slot reservation goes now, not at the next step (none may come while others hold)
                    self.adapters.still_wanted({w.adapter_id for w in self.waiting if w.adapter_id})
                    continue
                if lease is None:
                    slot_blocked = slot_blocked or self.adapters.waiting_for_slot(r.adapter_id)
                    continue
                r.adapter_handle = lease
                r.adapter_slot = lease.slot
                r.block_hashes = []  # the chain's root is the leased weights
                # A soft prompt's virtual tokens count like prompt tokens (budget, context).
                r.num_virtual = self.virtual_tokens(lease.slot)
                if r.num_virtual and (err := self._too_long(r)) is not None:
                    self._unlease(r)
                    self.waiting.remove(r)
                    on_error(r, err)
                    continue
            hit = self.prefix.match(r)
            computed = len(hit) * self.pool.block_size
            n = self._chunk(r, computed, step)
            if n == 0:  # what is left does not pay for its cached context: it starts next step
                self.pool.release(hit)
                break
            need = self.pool.blocks_for(computed + n) - len(hit)
            if need > self.pool.num_free:
                self.pool.release(hit)
                if not r.output_ids:  # never ran: hold no slot while it waits for blocks
                    self._unlease(r)
                break  # arrival order: nothing passes a request that waits for blocks
            self.waiting.remove(r)
            r.block_table = hit + [self.pool.allocate() for _ in range(need)]
            r.num_computed = computed
            r.num_scheduled = n
            if r.cached_tokens < 0:
                r.cached_tokens = min(max(computed - r.num_virtual, 0), r.prompt_len)
                if self.metrics is not None and self.prefix.enabled:
                    self.metrics.prefix_query(r.prompt_len, r.cached_tokens)
            r.status = Status.RUNNING
            if r.first_scheduled is None:
                r.first_scheduled = time.monotonic()
            self.running.append(r)
            scheduled.append(r)
            step.spend(self.cost.chunk(computed, n))

    def _chunk(self, r: Request, computed: int, step: _Budget) -> int:
        """Positions `r` computes this step: the rest of its sequence, as many as the step's budget affords.

        A chunk after `computed` positions of n tokens costs `cost.chunk(computed, n)`; the
        step's first chunk gets at least one block's worth (0: no budget left for `r`). A soft
        prompt is placed whole with at least one token after it (its virtual rows are one
        embedding lookup, its prefix one copy), even past the budget.
        """
        remaining = r.seq_len - computed
        n = min(remaining, max(self.cost.tokens_within(computed, step.left), step.floor))
        if n == 0:
            return 0
        if computed < r.num_virtual:
            n = max(n, min(remaining, r.num_virtual - computed + 1))
        return n

    def _grow(self, r: Request, total: int) -> bool:
        """Give running `r` the blocks for `total` positions, preempting the newest requests if needed.

        Returns False when `r` itself had to be preempted (it was the newest).
        """
        need = self.pool.blocks_for(total) - len(r.block_table)
        while need > self.pool.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is r:
                return False
        r.block_table.extend(self.pool.allocate() for _ in range(max(need, 0)))
        return True

    def _preempt(self, r: Request) -> None:
        """Free `r`'s blocks and queue it first; it keeps its output, lease and hash chain."""
        self.running.remove(r)
        self.pool.release(r.block_table)
        r.block_table = []
        r.num_computed = 0
        r.num_scheduled = 0
        r.status = Status.WAITING
        self.waiting.appendleft(r)
        self.preemptions += 1
        if self.metrics is not None:
            self.metrics.preempted()

    def computed(self, r: Request, before: int) -> None:
        """After a forward computed `r`'s positions `before` .. `r.num_computed`: address its full blocks."""
        self.prefix.commit(r, before)

    def _unlease(self, r: Request) -> None:
        if r.adapter_handle is not None and self.adapters is not None:
            self.adapters.release(r.adapter_handle)
        r.adapter_handle, r.adapter_slot, r.num_virtual = None, -1, 0
        r.block_hashes = []

    def _too_long(self, r: Request) -> InvalidParameter | None:
        """A soft-prompted request is checked against the context once its virtual tokens are known."""
        if r.num_virtual + r.prompt_len + r.params.max_new_tokens <= self.max_len:
            return None
        return InvalidParameter(
            "max_new_tokens",
            f"prompt ({r.prompt_len} tokens) + the adapter's {r.num_virtual} virtual tokens + max_new_tokens "
            f"({r.params.max_new_tokens}) exceeds the model's context of {self.max_len} tokens",
        )

    def finish(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        self.free(req)

    def free(self, req: Request) -> None:
        req.status = Status.FINISHED
        self.pool.release(req.block_table)
        req.block_table = []
        if req.adapter_handle is not None and self.adapters is not None:
            self.adapters.release(req.adapter_handle)
        req.adapter_handle = None

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running


class _Budget:
    """What is left of one step's budget for prompt chunks, and the tokens its first chunk gets regardless."""

    def __init__(self, left: float, floor: int) -> None:
        self.left = left
        self.floor = floor  # one block while no chunk was placed (prompts always progress), then 0

    def spend(self, cost: float) -> None:
        self.left -= cost
        self.floor = 0

    @property
    def exhausted(self) -> bool:
        return self.floor == 0 and self.left < 1


def _is_decode(r: Request) -> bool:
    """One generated token to extend (not a prefill chunk, nor a recompute after preemption)."""
    return r.num_scheduled == 1 and r.num_computed == r.seq_len - 1 and bool(r.output_ids)
