"""The one decoder-layer finder every wrapper and the merge policy use."""

from __future__ import annotations

from torch import nn


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the first one as long as config.num_hidden_layers."""
    cfg = getattr(model, "config", None)
    n_layers = getattr(cfg, "num_hidden_layers", None) if cfg is not None else None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (n_layers is None or len(module) == n_layers) and len(module) > 0:
            return name, module
    raise ValueError("could not find the decoder layers (an nn.ModuleList of num_hidden_layers blocks)")
