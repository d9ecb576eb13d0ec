"""What ListAdapters and GetAdapter say of each adapter, parsed once per (id, sha256)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loramux.adapters.cache.adapter_cache import AdapterCache
from loramux.adapters.kinds.base import AdapterInfo
from loramux.adapters.store.store import AdapterStore, StoredAdapter

log = logging.getLogger("loramux.api")

# Parse an adapter (config, weights path) against the base model with every check
# loading does; LoramuxServer.describe_adapter. Raises ValueError on a bad adapter.
Describe = Callable[[dict[str, Any], Path], AdapterInfo]
INFO_CACHE_ENTRIES = 4096  # AdapterInfo is small; the bound only stops unbounded growth


class AdapterInfos:
    """(id, sha256) -> AdapterInfo, bounded, so List/Get do not re-parse weights on every call.

    A parsed copy in the host tier saves a parse; an overwrite or delete `forget`s the id.
    """

    def __init__(self, store: AdapterStore, cache: AdapterCache, describe: Describe) -> None:
        self.store, self.cache, self.describe = store, cache, describe
        self._infos: OrderedDict[tuple[str, str], AdapterInfo] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, record: StoredAdapter) -> AdapterInfo:
        """What `record`'s weights are (type, rank, targets); a blank info if they changed or went since."""
        key = (record.adapter_id, record.sha256)
        with self._lock:
            info = self._infos.get(key)
        if info is not None:
            return info
        host_copy = self.cache.host.get(key)  # a parsed copy in host memory saves a parse
        if host_copy is not None:
            info = host_copy.info
        else:
            try:
                with self.store.reading(record.adapter_id) as current:
                    if current.sha256 != record.sha256:  # overwritten since the caller looked
                        return AdapterInfo(record.adapter_type or "", 0, [])
                    info = self.describe(current.config, current.weights_path)
            except KeyError:  # deleted since the caller looked
                return AdapterInfo(record.adapter_type or "", 0, [])
            except Exception as e:  # validated at upload or scan; a failure now is worth a log, not a failed List
                log.warning("adapter %s: cannot describe it: %s", record.adapter_id, e)
                return AdapterInfo(record.adapter_type or "", 0, [])
        self.remember(record, info)
        return info

    def remember(self, record: StoredAdapter, info: AdapterInfo) -> None:
        with self._lock:
            self._infos[(record.adapter_id, record.sha256)] = info
            while len(self._infos) > INFO_CACHE_ENTRIES:
                self._infos.popitem(last=False)

    def forget(self, adapter_id: str) -> None:
        with self._lock:
            for key in [k for k in self._infos if k[0] == adapter_id]:
                del self._infos[key]
