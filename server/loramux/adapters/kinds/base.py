"""What every adapter format produces: validated weights that can be installed into a slot.

A format parser (formats/peft.py, formats/adapterhub.py, ...) reads an adapter
directory, validates it against the wrapped base model, and returns a
`LoadedAdapter` in host memory (CPU, the model's dtype). The device tier copies it
with `to_device` and calls `install(wrapped, slot)`; eviction calls `uninstall`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loramux.adapters.contract import ADAPTER_TYPES, AdapterError

if TYPE_CHECKING:
    from loramux.adapters.model.wrapped import WrappedModel

__all__ = ["ADAPTER_TYPES", "AdapterError", "AdapterInfo", "LoadedAdapter"]


@dataclass
class AdapterInfo:
    adapter_type: str  # one of ADAPTER_TYPES
    rank: int  # the largest rank (LoRA/DoRA), bottleneck size, or virtual tokens; 0 for IA3
    target_modules: list[str] = field(default_factory=list)  # names of base modules it changes
    mergeable: bool = False  # whether W0 + delta can be precomputed (merged cache)


class LoadedAdapter(ABC):
    """Parsed and validated adapter weights, ready to install into a device slot."""

    info: AdapterInfo

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of tensor data held (for the host and device tier budgets)."""

    @abstractmethod
    def to_device(self, device: torch.device) -> LoadedAdapter:
        """A copy whose tensors live on `device` (self when already there)."""

    @abstractmethod
    def install(self, wrapped: WrappedModel, slot: int) -> None:
        """Make `slot` compute this adapter in every layer it touches."""

    @abstractmethod
    def uninstall(self, wrapped: WrappedModel, slot: int) -> None:
        """Clear `slot` in every layer this adapter touched."""
