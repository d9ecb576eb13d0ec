"""Token events from the engine's thread to the event loop: one wake-up for a step's events.

The engine calls a request's sink once per step with that step's event, for every running
request. Handing each event over with its own `loop.call_soon_threadsafe` wakes the loop
once per event (a write to the loop's self-pipe: a syscall in the engine's thread, the
GIL released and re-taken), so 64 times per step for 64 running requests. The bridge
appends events to one list under a lock and schedules a drain only when none is pending;
the drain, on the loop, puts every event into its request's queue. An event is never
held back: the first of a batch schedules the drain at once, the rest ride along.
Order is kept per request (and overall): events are appended as the engine emits them
and drained first in, first out.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable

from loramux.engine.request import TokenEvent


class EventBridge:
    """`sink(queue)` is a request's sink (called from the engine's thread) into `queue` on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]] = []
        self._scheduled = False  # a drain is scheduled on the loop and has not yet taken the list

    def sink(self, queue: asyncio.Queue[TokenEvent]) -> Callable[[TokenEvent], None]:
        return functools.partial(self._put, queue)

    def _put(self, queue: asyncio.Queue[TokenEvent], ev: TokenEvent) -> None:
        with self._lock:
            self._pending.append((queue, ev))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody reads these events any more
            with self._lock:
                self._pending.clear()
                self._scheduled = False
            raise

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for queue, ev in pending:
            queue.put_nowait(ev)
