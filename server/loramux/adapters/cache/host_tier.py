"""The host-memory tier: parsed, validated adapters on the CPU, LRU within a byte budget.

Keys are (adapter_id, weights sha256). The engine thread adds and drops entries;
the load worker and the API read them, so every access takes the lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from loramux.adapters.kinds.base import LoadedAdapter

Key = tuple[str, str]  # (adapter_id, weights sha256)


class HostTier:
    def __init__(self, budget_bytes: int, metrics: Any = None) -> None:
        self.budget = budget_bytes
        self.metrics = metrics
        self._entries: OrderedDict[Key, LoadedAdapter] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Key) -> LoadedAdapter | None:
        with self._lock:
            return self._entries.get(key)

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, key: Key, adapter: LoadedAdapter) -> None:
        """Keep `adapter` as the most recently used; evict the least recently used over budget
        (the new one too, last, when it alone is over it: `--host-cache-mb 0` keeps nothing)."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes()
            self._entries[key] = adapter
            self._bytes += adapter.nbytes()
            while self._bytes > self.budget and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes()
                if self.metrics is not None:
                    self.metrics.eviction("host")

    def drop(self, adapter_id: str) -> None:
        """Forget every version of `adapter_id` (after an overwrite or delete)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == adapter_id]:
                self._bytes -= self._entries.pop(key).nbytes()
