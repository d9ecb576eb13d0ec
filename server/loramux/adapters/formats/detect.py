"""From an adapter's config and weights file to a validated `LoadedAdapter`, whatever its format.

Formats are told apart by the config alone: PEFT configs carry `peft_type`,
AdapterHub (`adapters` library) configs carry a `config` object with an
`architecture`. Weights are safetensors only; pickle files are never opened.
"""

from __future__ import annotations

import json
from pathlib import Path

from loramux.adapters.adapter import AdapterError, LoadedAdapter
from loramux.adapters.formats.adapterhub import parse_adapterhub
from loramux.adapters.formats.peft import parse_peft
from loramux.adapters.formats.peft_prompt import parse_peft_prompt

CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
ADAPTERHUB_WEIGHTS = "adapter.safetensors"
# Pickle weight files: refused with a pointer to safetensors, never unpickled.
_PICKLE_FILES = ("adapter_model.bin", "pytorch_adapter.bin", "adapter_model.pt", "adapter.bin")

_PEFT_PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING")


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
    if not isinstance(config, dict):
        raise AdapterError("adapter config must be a JSON object")
    return config


def is_adapterhub_config(config: dict) -> bool:
    # `save_adapter` writes {"config": {...}, "name", ...}; a union's config carries
    # "architecture", a plain bottleneck config (BnConfig) only its fields.
    inner = config.get("config")
    return isinstance(inner, dict) and any(k in inner for k in ("architecture", "mh_adapter", "output_adapter"))


def parse_adapter(config: dict, weights_path: Path, wrapped) -> LoadedAdapter:  # wrapped: WrappedModel
    """Validate `config` + the safetensors file at `weights_path` against `wrapped`."""
    weights_path = Path(weights_path)
    if "peft_type" in config:
        peft_type = config["peft_type"]
        if peft_type in ("LORA", "IA3"):
            return parse_peft(config, weights_path, wrapped)
        if peft_type in _PEFT_PROMPT_TYPES:
            # PEFT prompt learning: virtual token embeddings or per-layer KV prefixes (soft prompts)
            return parse_peft_prompt(config, weights_path, wrapped)
        raise AdapterError(
            f"PEFT peft_type {peft_type!r} is not supported (LORA with or without DoRA, IA3, PROMPT_TUNING, "
            "P_TUNING and PREFIX_TUNING are)"
        )
    if is_adapterhub_config(config):
        # AdapterHub bottleneck adapters (plain, or a "union" of series and parallel parts)
        return parse_adapterhub(config, weights_path, wrapped)
    raise AdapterError("unrecognised adapter config: neither a PEFT config (peft_type) nor an AdapterHub config")


def weights_file_for(config: dict, directory: Path) -> Path:
    """Where the weights of an adapter with this config live in `directory`."""
    name = ADAPTERHUB_WEIGHTS if is_adapterhub_config(config) else PEFT_WEIGHTS
    path = Path(directory) / name
    if path.is_file():
        return path
    pickles = [p for p in _PICKLE_FILES if (Path(directory) / p).is_file()]
    if pickles:
        raise AdapterError(
            f"{pickles[0]} is a pickle file, which loramux never loads (it can run code); "
            f"save the adapter as safetensors ({name}), e.g. save_pretrained(..., safe_serialization=True)"
        )
    raise AdapterError(f"no {name} in {Path(directory).name}")


def load_adapter_dir(directory: Path, wrapped) -> LoadedAdapter:
    """Parse the adapter saved in `directory` (adapter_config.json + safetensors weights)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"no {CONFIG_FILE} in {directory.name}")
    config = read_config(config_path)
    return parse_adapter(config, weights_file_for(config, directory), wrapped)
