"""Which base modules a PEFT config targets, resolved exactly as PEFT resolves them.

Mirrors peft.tuners.tuners_utils.check_target_module_exists (list: exact name or
".suffix"; string: re.fullmatch; layers_to_transform / layers_pattern;
exclude_modules), the "all-linear" shorthand, and IA3's feedforward_modules.
Names are the module names of the unwrapped base model (model.named_modules()).
"""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from loramux.adapters.kinds.base import AdapterError

# Module types PEFT can put an adapter on; matching one that loramux does not wrap is refused.
_TARGETABLE = (nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def resolve_targets(config: dict, wrapped) -> dict[str, bool | None]:  # wrapped: WrappedModel
    """{targeted module name: IA3 feedforward flag (None: not given / not IA3)}.

    Refuses configs that target nothing, or target modules loramux does not wrap.
    """
    target = config.get("target_modules")
    if target is None:
        raise AdapterError("target_modules is not set; loramux needs the adapter's target modules spelled out")
    if not isinstance(target, (str, list)) or (
        isinstance(target, list) and not all(isinstance(t, str) for t in target)
    ):
        raise AdapterError(f"target_modules must be a string or a list of strings, got {target!r}")
    check_target_fields(config)
    candidates = _candidate_names(wrapped)
    if isinstance(target, str) and target.lower() == "all-linear":
        out_emb = _output_embedding_name(wrapped.model)
        matched = [n for n, m in candidates.items() if isinstance(m, (nn.Linear, Conv1D)) and n != out_emb]
        matched = [n for n in matched if not _excluded(config, n)]
    else:
        matched = [n for n in candidates if _matches(config, n)]
    if not matched:
        raise AdapterError(f"target_modules {target!r} matches no module of the base model")
    unservable = sorted(n for n in matched if n not in wrapped.linears)
    if unservable:
        raise AdapterError(
            "target_modules selects modules loramux cannot adapt (only linear projections inside the decoder "
            f"layers): {', '.join(unservable)}"
        )
    ff = config.get("feedforward_modules") if config.get("peft_type") == "IA3" else None
    return {n: _is_feedforward(ff, n) for n in matched}


def check_target_fields(config: dict) -> None:
    """Refuse, naming the field, what PEFT's matching would choke on: wrong types and bad regexes."""
    for key in ("target_modules", "exclude_modules", "layers_pattern", "feedforward_modules"):
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            if key == "layers_pattern":
                for v in value:
                    _regex(key, v)
            continue
        if not isinstance(value, str):
            raise AdapterError(f"{key} must be a string or a list of strings, got {_short(value)}")
        if key != "target_modules" or value.lower() != "all-linear":
            _regex(key, value)
    indexes = config.get("layers_to_transform")
    if (
        indexes is not None
        and not _is_index(indexes)
        and not (isinstance(indexes, list) and all(_is_index(i) for i in indexes))
    ):
        raise AdapterError(f"layers_to_transform must be a layer index or a list of them, got {_short(indexes)}")


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _regex(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise AdapterError(f"{key}: {_short(pattern)} is not a valid regular expression ({e})") from None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _candidate_names(wrapped) -> dict[str, nn.Module]:
    """Original names of every module PEFT could target: the wrapped linears plus unwrapped ones."""
    names: dict[str, nn.Module] = {name: layer.base_layer for name, layer in wrapped.linears.items()}
    inner = {id(layer.base_layer) for layer in wrapped.linears.values()}
    for name, module in wrapped.model.named_modules():
        if isinstance(module, _TARGETABLE) and id(module) not in inner:
            names[name] = module
    return names


def _output_embedding_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if get is not None else None
    return next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None


def _excluded(config: dict, key: str) -> bool:
    exclude = config.get("exclude_modules")
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, key) is not None
    return key in exclude or any(key.endswith(f".{e}") for e in exclude)


def _matches(config: dict, key: str) -> bool:
    """peft's check_target_module_exists for one module name."""
    if _excluded(config, key):
        return False
    target = config["target_modules"]
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    if key in target:  # an exact name: PEFT does not apply layers_to_transform here
        return True
    if not any(key.endswith(f".{t}") for t in target):
        return False
    indexes = config.get("layers_to_transform")
    if indexes is None or indexes == []:
        return True
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
        # PEFT: the lazy .*? takes the first numbered segment (the layer index)
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def _is_feedforward(ff: str | list[str] | None, key: str) -> bool | None:
    """IA3's _check_target_module_feedforward. Note: a list entry matches as a plain suffix, no dot."""
    if ff is None:
        return None
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    if not isinstance(ff, list):
        raise AdapterError(f"feedforward_modules must be a string or a list of strings, got {ff!r}")
    return any(key.endswith(t) for t in ff)
