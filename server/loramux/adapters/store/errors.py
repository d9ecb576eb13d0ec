"""The store's own refusals (the rest are the ValueErrors of layout, upload and the safetensors check)."""

from __future__ import annotations


class AlreadyExists(Exception):
    """Upload of an existing id without overwrite (ALREADY_EXISTS)."""


class AdapterNotFound(KeyError):
    """No adapter with this id in the store (NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "adapter not found"
