"""One re-entrant lock per adapter id, made on first use and dropped with its last user."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class IdLocks:
    """`with locks(adapter_id):` serialises everything done under one id.

    Reference-counted, so the map does not grow with every id ever seen.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, list[Any]] = {}  # id -> [RLock, users]

    @contextmanager
    def __call__(self, adapter_id: str) -> Iterator[None]:
        with self._lock:
            entry = self._locks.setdefault(adapter_id, [threading.RLock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[adapter_id]
