"""Who waits for a device slot, and the one slot reserved for them.

When every slot is held, a request for another adapter reserves the slot that frees
soonest: no new leases on it, so its running requests finish, it goes idle, and the
waiting adapter claims it (no starvation). A reservation belongs to the adapter it was
made for and holds only while something wants that adapter: a waiting request (the
scheduler says which, each step, through `still_wanted`) or a LoadAdapter call in
progress (`prefetching`). Cancelled, expired, failed or served from another slot, its
owner is gone and the reservation lapses. Engine thread only, like the slot table.
"""

from __future__ import annotations

import logging

from loramux.adapters.cache.slot import Slot

log = logging.getLogger("loramux.adapters")


class Reservations:
    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots
        self.blocked: set[str] = set()  # adapters that wait for a slot (every slot held)
        self.wanted: set[str] = set()  # the adapters of waiting requests (the last `still_wanted`)
        self.prefetching: set[str] = set()  # the adapters of LoadAdapter calls in progress

    def waiting_for_slot(self, adapter_id: str) -> bool:
        return adapter_id in self.blocked

    def still_wanted(self, adapter_ids: set[str]) -> None:
        """The adapters of every waiting request: waits and reservations of any other adapter lapse."""
        self.wanted = set(adapter_ids)
        self.blocked &= self.wanted | self.prefetching
        for slot in self.slots:
            if slot.draining and not self.owner_alive(slot):
                log.info(
                    "device slot %d: the reservation for %s lapsed (nothing waits for it)",
                    slot.index,
                    slot.reserved_for,
                )
                slot.reserved_for = None

    def owner_alive(self, slot: Slot) -> bool:
        owner = slot.reserved_for
        return owner is not None and (owner in self.wanted or owner in self.prefetching)

    def wait(self, owner: str) -> None:
        """Every slot is held: `owner` waits, and reserves the slot that frees soonest (fewest
        running requests). One reservation at a time; the slots not reserved keep serving their
        adapters, so a request waiting for a slot costs the batch one slot, not all."""
        self.blocked.add(owner)
        for s in self.slots:
            if s.draining and not self.owner_alive(s):
                s.reserved_for = None
        if any(s.draining for s in self.slots):
            return
        candidates = [s for s in self.slots if s.adapter is not None and not s.pinned and s.loading is None]
        if candidates:
            victim = min(candidates, key=lambda s: (s.refs, s.last_used))
            victim.reserved_for = owner
            log.info(
                "reserving device slot %d (adapter %s) for a waiting request for %s", victim.index, victim.key[0], owner
            )

    def unreserve(self, owner: str) -> None:
        for s in self.slots:
            if s.reserved_for == owner:
                s.reserved_for = None

    def end_prefetch(self, owner: str) -> None:
        """The LoadAdapter call for `owner` is over: unless a request waits for it, it lapses."""
        self.prefetching.discard(owner)
        if owner not in self.wanted:
            self.blocked.discard(owner)
            self.unreserve(owner)
