"""Reading an adapter's safetensors weights (never pickle): the one reader the PEFT parsers use."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from loramux.adapters.contract import AdapterError


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU; anything else (pickle, a bad header) is an AdapterError."""
    if Path(path).suffix != ".safetensors":
        raise AdapterError(f"{Path(path).name}: only safetensors weights are accepted (never pickle)")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers / truncation
        raise AdapterError(f"{Path(path).name} is not a readable safetensors file: {e}") from e
