"""Shared pieces of the store tests: small safetensors payloads and an upload through a session."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from loramux.adapters.store.store import AdapterStore, StoredAdapter

PEFT_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
HUB_CONFIG = {"name": "a", "config": {"architecture": "bottleneck", "reduction_factor": 16}}
MAX = 1 << 20


def weights(seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save({"a": torch.randn(2, 8, generator=g), "b": torch.randn(8, 2, generator=g)})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lora_validator(calls: list[Path] | None = None) -> Any:
    def validate(config: dict[str, Any], path: Path) -> str:
        if calls is not None:
            calls.append(path)
        assert (path.parent / "adapter_config.json").is_file()  # the parser may read the directory
        return "lora"

    return validate


def upload(
    store: AdapterStore,
    adapter_id: str,
    data: bytes,
    config: dict[str, Any] = PEFT_CONFIG,
    overwrite: bool = False,
    validate: Any = None,
    chunk: int = 100,
) -> StoredAdapter:
    session = store.begin_upload(adapter_id, json.dumps(config), sha(data), len(data), overwrite, MAX)
    with session:
        for i in range(0, len(data), chunk):
            session.write(data[i : i + chunk])
        return session.finish(validate or lora_validator())


def internal_empty(root: Path) -> bool:
    return not any((root / ".staging").iterdir()) and not any((root / ".trash").iterdir())
