"""Map failures to gRPC status codes, as DESIGN.md's error table says."""

from __future__ import annotations

import grpc

from loramux.adapters.cache.adapter_cache import SlotsPinned
from loramux.adapters.store.store import AdapterNotFound, AlreadyExists, UploadTooLarge
from loramux.engine.engine import Draining
from loramux.engine.scheduler import QueueFull


class NotFound(KeyError):
    """An unknown adapter id (NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError quotes its message; ours is a sentence
        return str(self.args[0]) if self.args else "not found"


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception raised while serving a request."""
    if isinstance(exc, (NotFound, AdapterNotFound)):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, AlreadyExists):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, (QueueFull, UploadTooLarge, SlotsPinned)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, Draining):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, ValueError):  # AdapterError, ChecksumMismatch and bad parameters are ValueErrors
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL
