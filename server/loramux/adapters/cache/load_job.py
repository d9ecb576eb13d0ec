"""The adapter cache's load job (worker thread): host tier or disk -> validated adapter -> device copy."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loramux.adapters.cache.host_tier import HostTier, Key
from loramux.adapters.formats.loader import parse_adapter
from loramux.adapters.kinds.base import LoadedAdapter
from loramux.adapters.model.wrapped import WrappedModel
from loramux.adapters.store.store import AdapterStore


@dataclass
class LoadResult:
    key: Key
    adapter: LoadedAdapter  # on the device
    seconds: float
    tier: str  # where it came from: "host" or "store"
    host_copy: LoadedAdapter | None = field(default=None)


class Stale(Exception):
    """The weights changed between asking for a load and reading them."""


def load(key: Key, host_tier: HostTier, store: AdapterStore, wrapped: WrappedModel) -> LoadResult:
    """Worker thread: host tier or disk -> validated adapter -> device copy."""
    t0 = time.perf_counter()
    host = host_tier.get(key)
    tier = "host"
    if host is None:
        tier = "store"
        with store.reading(key[0]) as record:
            if record.sha256 != key[1]:
                raise Stale()
            host = parse_adapter(record.config, record.weights_path, wrapped)
    device_copy = host.to_device(wrapped.device)
    return LoadResult(key, device_copy, time.perf_counter() - t0, tier, host)
