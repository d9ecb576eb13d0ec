"""Bottleneck adapter insertion points (AdapterHub kinds). Placeholder until the bottleneck work lands."""

from __future__ import annotations

from torch import nn

from loramux.adapters.context import ContextHolder


def wrap_blocks(model: nn.Module, holder: ContextHolder, num_slots: int) -> dict[int, nn.Module]:
    return {}
