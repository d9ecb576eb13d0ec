"""A soft prompt: virtual token embeddings (prompt tuning, p-tuning) or a per-layer key/value prefix.

Soft prompts change a request's input, not the network: nothing is installed in
the wrapped layers. Installing one into a device slot registers it in
`WrappedModel.soft_prompts`, where the runner finds it for every request holding
that slot. A soft prompt is never merged (there is no weight delta to merge).

How each kind enters a request's sequence (as PEFT's forward does it):
- prompt: the N virtual embeddings are rows 0..N-1 of the sequence, before the
  prompt's token embeddings; positions run 0..N+L-1 over both.
- prefix: the P key/value pairs of every layer fill the request's KV-cache row at
  positions 0..P-1 before its prompt is prefilled; the prompt's tokens then sit at
  positions P..P+L-1 and attend to the prefix like to any earlier context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loramux.adapters.kinds.base import AdapterError, AdapterInfo, LoadedAdapter

if TYPE_CHECKING:
    from loramux.adapters.model.wrapped import WrappedModel


class SoftPrompt(LoadedAdapter):
    def __init__(
        self,
        info: AdapterInfo,
        embeddings: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ) -> None:
        if (embeddings is None) == (prefix is None):
            raise ValueError("a soft prompt holds either virtual token embeddings or a key/value prefix")
        self.info = info
        # embeddings: [N, hidden], the virtual tokens' input embeddings (model dtype)
        self.embeddings = embeddings
        # prefix: [layers, 2 (key, value), kv_heads, P, head_dim], keys as attention stores them (no RoPE added)
        self.prefix = prefix

    @property
    def kind(self) -> str:
        return "prompt" if self.embeddings is not None else "prefix"

    @property
    def num_virtual(self) -> int:
        """Positions it takes in front of the prompt (N virtual tokens, or P prefix entries)."""
        if self.embeddings is not None:
            return int(self.embeddings.shape[0])
        return int(self.prefix.shape[3])

    def _tensor(self) -> torch.Tensor:
        return self.embeddings if self.embeddings is not None else self.prefix

    def nbytes(self) -> int:
        return self._tensor().nbytes

    def to_device(self, device: torch.device) -> SoftPrompt:
        if self._tensor().device == torch.device(device):
            return self
        return SoftPrompt(self.info, _to(self.embeddings, device), _to(self.prefix, device))

    def install(self, wrapped: WrappedModel, slot: int) -> None:
        if not 0 <= slot < wrapped.num_slots:
            raise AdapterError(f"slot {slot} out of range [0, {wrapped.num_slots})")
        wrapped.soft_prompts[slot] = self

    def uninstall(self, wrapped: WrappedModel, slot: int) -> None:
        if wrapped.soft_prompts.get(slot) is self:
            del wrapped.soft_prompts[slot]


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)
