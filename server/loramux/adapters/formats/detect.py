"""Which format an adapter is in, and where its weights file is: the one place that decides it.

Formats are told apart by the config alone: PEFT configs carry `peft_type`,
AdapterHub (`adapters` library) configs carry a `config` object (a union's with an
`architecture`, a plain bottleneck config with its fields). Weights are
safetensors only; pickle files are never opened. No torch here: the store uses it.
"""

from __future__ import annotations

import json
from pathlib import Path

from loramux.adapters.contract import AdapterError

CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
ADAPTERHUB_WEIGHTS = "adapter.safetensors"
# Pickle weight files: refused with a pointer to safetensors, never unpickled.
PICKLE_FILES = ("adapter_model.bin", "pytorch_adapter.bin", "adapter_model.pt", "adapter.bin")

PEFT_PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING")


class UnknownFormat(AdapterError):
    """A config that is neither PEFT nor AdapterHub."""


def read_config(path: Path) -> dict:
    """Read an adapter config file (JSON object); any problem is an AdapterError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(f"cannot read {Path(path).name}: {e}") from e
    return config_from_json(text)


def config_from_json(text: str) -> dict:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterError(f"adapter config is not valid JSON: {e}") from e
    except RecursionError:
        raise AdapterError("adapter config JSON is nested too deeply") from None
    if not isinstance(config, dict):
        raise AdapterError("adapter config must be a JSON object")
    return config


def is_adapterhub_config(config: dict) -> bool:
    # `save_adapter` writes {"config": {...}, "name", ...}; a union's config carries
    # "architecture", a plain bottleneck config (BnConfig) only its fields.
    inner = config.get("config")
    return isinstance(inner, dict) and any(k in inner for k in ("architecture", "mh_adapter", "output_adapter"))


def detect(config: dict) -> str:
    """The parser a config needs: "peft" (LoRA, DoRA, IA3), "peft_prompt" or "adapterhub"."""
    if "peft_type" in config:
        peft_type = config["peft_type"]
        if peft_type in ("LORA", "IA3"):
            return "peft"
        if peft_type in PEFT_PROMPT_TYPES:
            return "peft_prompt"  # PEFT prompt learning: virtual token embeddings or per-layer KV prefixes
        raise AdapterError(
            f"PEFT peft_type {peft_type!r} is not supported (LORA with or without DoRA, IA3, PROMPT_TUNING, "
            "P_TUNING and PREFIX_TUNING are)"
        )
    if is_adapterhub_config(config):
        return "adapterhub"  # AdapterHub bottleneck adapters (plain, or a "union" of series and parallel parts)
    raise UnknownFormat("unrecognised adapter config: neither a PEFT config (peft_type) nor an AdapterHub config")


def weights_name(config: dict) -> str:
    """The weights file name the config's format uses (the store names files by it before parsing)."""
    if "peft_type" in config:
        return PEFT_WEIGHTS
    if isinstance(config.get("config"), dict):
        return ADAPTERHUB_WEIGHTS
    raise UnknownFormat("adapter config has neither 'peft_type' (PEFT) nor a 'config' object (AdapterHub)")


def find_weights(config: dict, directory: Path) -> Path:
    """The weights file of an adapter with this config in `directory`; pickle files are refused."""
    name = weights_name(config)
    path = Path(directory) / name
    if path.is_file():
        return path
    pickles = [p for p in PICKLE_FILES if (Path(directory) / p).is_file()]
    if pickles:
        raise AdapterError(
            f"{pickles[0]} is a pickle file, which loramux never loads (it can run code); "
            f"save the adapter as safetensors ({name}), e.g. save_pretrained(..., safe_serialization=True)"
        )
    raise AdapterError(f"no {name} in {Path(directory).name}")
