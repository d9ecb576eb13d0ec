"""A device slot of the adapter cache, and a running request's lease on one."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from loramux.adapters.cache.host_tier import Key
from loramux.adapters.kinds.base import LoadedAdapter

__all__ = ["Key", "Lease", "Slot"]


@dataclass
class Lease:
    """A running request's hold on a device slot."""

    slot: int
    key: Key


@dataclass
class Slot:
    index: int
    key: Key | None = None
    adapter: LoadedAdapter | None = None  # the device copy, once installed
    loading: Future | None = None  # worker job filling this slot
    refs: int = 0
    pinned: bool = False
    last_used: float = 0.0
    # reserved for the adapter of a request that found every slot held: no new leases, so its
    # running requests finish, it goes idle, and the waiting request claims it (no starvation).
    # The reservation lapses as soon as no waiting request or LoadAdapter call wants that adapter.
    reserved_for: str | None = None

    @property
    def draining(self) -> bool:
        return self.reserved_for is not None

    @property
    def busy(self) -> bool:
        return self.refs > 0 or self.pinned or self.loading is not None
