"""From an adapter's config and weights file to a validated `LoadedAdapter`, whatever its format."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from loramux.adapters.contract import AdapterError
from loramux.adapters.formats.adapterhub import parse_adapterhub
from loramux.adapters.formats.detect import CONFIG_FILE, detect, find_weights, read_config
from loramux.adapters.formats.peft import parse_peft
from loramux.adapters.formats.peft_prompt import parse_peft_prompt

if TYPE_CHECKING:
    from loramux.adapters.kinds.base import LoadedAdapter
    from loramux.adapters.model.wrapped import WrappedModel


def parse_adapter(config: dict, weights_path: Path, wrapped: WrappedModel) -> LoadedAdapter:
    """Validate `config` + the safetensors file at `weights_path` against `wrapped`."""
    parse = {"peft": parse_peft, "peft_prompt": parse_peft_prompt, "adapterhub": parse_adapterhub}[detect(config)]
    return parse(config, Path(weights_path), wrapped)


def load_adapter_dir(directory: Path, wrapped: WrappedModel) -> LoadedAdapter:
    """Parse the adapter saved in `directory` (adapter_config.json + safetensors weights)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"no {CONFIG_FILE} in {directory.name}")
    config = read_config(config_path)
    return parse_adapter(config, find_weights(config, directory), wrapped)
