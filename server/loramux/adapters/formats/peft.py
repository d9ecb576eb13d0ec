"""PEFT adapters (LoRA, DoRA, IA3) as `PeftModel.save_pretrained` writes them.

The directory holds adapter_config.json and adapter_model.safetensors, with keys
like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. The config
is checked field by field: fields that do not change inference are accepted,
fields that would change it and that loramux cannot honour are refused by name,
so nothing is ever silently served differently from PEFT.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from loramux.adapters.formats.peft_targets import check_target_fields, resolve_targets
from loramux.adapters.formats.tensors import read_safetensors
from loramux.adapters.kinds.base import AdapterError, AdapterInfo
from loramux.adapters.kinds.lora import dora_row_scale
from loramux.adapters.kinds.peft_adapter import ModuleWeights, PeftAdapter

KEY_PREFIX = "base_model.model."

# Fields that never change what inference computes (bookkeeping, training-only, init-only: weights are saved).
_COMMON_HARMLESS = {
    "peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "target_modules", "exclude_modules", "fan_in_fan_out",
}  # fmt: skip
_LORA_HARMLESS = _COMMON_HARMLESS | {
    "r", "lora_alpha", "use_rslora", "lora_dropout", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "use_dora", "bias", "lora_bias", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "megatron_core", "qalora_group_size",
}  # fmt: skip
_IA3_HARMLESS = _COMMON_HARMLESS | {"feedforward_modules", "init_ia3_weights"}
# Fields accepted only at their neutral value (None, False, empty): anything else changes computation.
_NEUTRAL_ONLY = {
    "modules_to_save", "layer_replication", "use_qalora", "trainable_token_indices", "alora_invocation_tokens",
    "target_parameters", "megatron_config", "arrow_config", "kasa_config", "monteclora_config", "velora_config",
    "use_bdlora", "ensure_weight_tying",
}  # fmt: skip

# Weight key suffix -> kind; longer suffixes first so ".lora_B.bias" is not read as a base ".bias".
_SUFFIXES = (
    (".lora_A.weight", "lora_A"),
    (".lora_B.weight", "lora_B"),
    (".lora_B.bias", "lora_bias"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".ia3_l", "ia3"),
    (".base_layer.bias", "bias"),
    (".bias", "bias"),
)


def parse_peft(config: dict, weights_path: Path, wrapped) -> PeftAdapter:  # wrapped: WrappedModel
    """Validate a PEFT LoRA / DoRA / IA3 adapter against `wrapped` and return it in host memory."""
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "IA3"):
        raise AdapterError(f"peft_type {peft_type!r} is not a LoRA or IA3 adapter")
    is_lora = peft_type == "LORA"
    _check_fields(config, _LORA_HARMLESS if is_lora else _IA3_HARMLESS)
    if is_lora:
        _check_lora_options(config)
    targeted = resolve_targets(config, wrapped)
    tensors = _group_by_module(read_safetensors(weights_path), wrapped)
    dtype = wrapped.dtype
    modules: dict[str, ModuleWeights] = {}
    ranks = [0]
    for name in sorted(set(targeted) | set(tensors)):
        parts = tensors.get(name, {})
        adapter_kinds = set(parts) - {"bias"}
        if name not in targeted and adapter_kinds:
            raise AdapterError(
                f"weights for {name} ({', '.join(sorted(adapter_kinds))}), which target_modules does not select"
            )
        layer = wrapped.linears.get(name)
        if layer is None:  # a base bias of a module loramux does not wrap (bias="all": LayerNorms)
            _check_unwrapped_bias(name, parts, wrapped)
            continue
        mw = ModuleWeights()
        if name in targeted:
            if is_lora:
                ranks.append(_lora_weights(mw, name, parts, layer, config))
            else:
                _ia3_weights(mw, name, parts, layer, config, targeted[name])
        if "bias" in parts:
            mw.bias_delta = _bias_delta(name, parts["bias"], layer)
        modules[name] = mw.cast(dtype, name)
    modules = {n: m for n, m in modules.items() if not m.is_empty()}
    if not modules:
        raise AdapterError(f"the adapter changes no module of the base model (targets {config.get('target_modules')})")
    kind = "ia3" if not is_lora else ("dora" if config.get("use_dora") else "lora")
    info = AdapterInfo(adapter_type=kind, rank=max(ranks), target_modules=sorted(modules), mergeable=True)
    return PeftAdapter(info=info, modules=modules)


def _check_fields(config: dict, harmless: set[str]) -> None:
    for key, value in config.items():
        if key in harmless:
            continue
        if key in _NEUTRAL_ONLY:
            if value in (None, False) or value == [] or value == {}:
                continue
            raise AdapterError(f"adapter_config.json sets {key}={value!r}, which loramux does not support")
        raise AdapterError(f"adapter_config.json has field {key!r}, unknown to loramux; refusing rather than guessing")


def _check_lora_options(config: dict) -> None:
    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"lora_alpha must be a number, got {alpha!r}")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise AdapterError(f"bias must be 'none', 'all' or 'lora_only', got {config.get('bias')!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = config.get(key) or {}
        if not isinstance(pat, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in pat.values()
        ):
            raise AdapterError(f"{key} must map module patterns to numbers, got {str(pat)[:200]}")
        for p, v in pat.items():
            try:
                re.compile(rf"(.*\.)?({p})$")
            except (re.error, RecursionError, OverflowError) as e:
                raise AdapterError(f"{key}: {p[:200]!r} is not a valid regular expression ({e})") from None
            if key == "rank_pattern" and (v != int(v) or v < 1):
                raise AdapterError(f"rank_pattern: the rank for {p[:200]!r} must be a positive integer, got {v!r}")
    check_target_fields(config)
    if config.get("use_dora") and config.get("lora_bias"):
        raise AdapterError("lora_bias=True with use_dora=True is not a valid PEFT adapter")


def _group_by_module(tensors: dict[str, torch.Tensor], wrapped) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {kind: tensor}}; every key must name a module of the base model."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    bad: list[str] = []
    for key, t in tensors.items():
        kind = next((k for suffix, k in _SUFFIXES if key.endswith(suffix)), None)
        if not key.startswith(KEY_PREFIX) or kind is None:
            bad.append(key)
            continue
        suffix = next(s for s, k in _SUFFIXES if key.endswith(s))
        name = key[len(KEY_PREFIX) : -len(suffix)]
        if name not in wrapped.linears and not (kind == "bias" and _base_param(wrapped, f"{name}.bias") is not None):
            bad.append(key)
            continue
        if kind in grouped.setdefault(name, {}):
            raise AdapterError(f"two tensors for {name} {kind}")
        grouped[name][kind] = t
    if bad:
        shown = ", ".join(sorted(bad)[:10]) + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
        raise AdapterError(f"weights that match no adaptable module of the base model: {shown}")
    return grouped


def _need(parts: dict[str, torch.Tensor], kind: str, name: str) -> torch.Tensor:
    if kind not in parts:
        raise AdapterError(f"{name}: the weights file has no {kind}")
    return parts[kind]


def _shape(t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != shape:
        raise AdapterError(f"{what} has shape {tuple(t.shape)}, but the base model needs {shape}")


def _pattern_value(patterns: dict, key: str, default: float) -> float:
    # PEFT's get_pattern_key: the first pattern P (in file order) with re.match(rf"(.*\.)?({P})$", key)
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def _lora_weights(mw: ModuleWeights, name: str, parts: dict, layer, config: dict) -> int:
    """Fill mw with s·B, A, s·lora_bias and DoRA's g; returns the rank."""
    unknown = set(parts) - {"lora_A", "lora_B", "lora_bias", "magnitude", "bias"}
    if unknown:
        raise AdapterError(f"{name}: {', '.join(sorted(unknown))} weights in a LoRA adapter")
    r = int(_pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8)))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    a, b = _need(parts, "lora_A", name), _need(parts, "lora_B", name)
    _shape(a, (r, layer.in_features), f"{name}.lora_A (rank {r})")
    _shape(b, (layer.out_features, r), f"{name}.lora_B (rank {r})")
    s = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    mw.a = a.float()
    mw.b = b.float() * s  # [out, r]
    if config.get("lora_bias"):
        lb = _need(parts, "lora_bias", name)
        _shape(lb, (layer.out_features,), f"{name}.lora_B.bias")
        mw.lora_bias = lb.float() * s
    elif "lora_bias" in parts:
        raise AdapterError(f"{name}: a lora_B.bias in the weights but lora_bias is not set in the config")
    if config.get("use_dora"):
        m = _need(parts, "magnitude", name)
        _shape(m, (layer.out_features,), f"{name}.lora_magnitude_vector")
        _finite({"magnitude": m, "A": a, "B": b}, name)
        with torch.no_grad():
            mw.dora_g = dora_row_scale(layer.base_weight_rows(), mw.a, mw.b, m).cpu()
    elif "magnitude" in parts:
        raise AdapterError(f"{name}: a DoRA magnitude vector in the weights but use_dora is not set")
    return r


def _ia3_weights(mw: ModuleWeights, name: str, parts: dict, layer, config: dict, feedforward: bool | None) -> None:
    unknown = set(parts) - {"ia3"}
    if unknown:
        raise AdapterError(f"{name}: {', '.join(sorted(unknown))} weights in an IA3 adapter")
    vec = _need(parts, "ia3", name)
    ff_shape, out_shape = (1, layer.in_features), (layer.out_features, 1)
    if feedforward is None:  # feedforward_modules absent: PEFT's shapes tell which kind it is
        feedforward = tuple(vec.shape) == ff_shape and ff_shape != out_shape
    _shape(vec, ff_shape if feedforward else out_shape, f"{name}.ia3_l (feedforward={feedforward})")
    mw.ia3 = vec.float().flatten()
    mw.ia3_feedforward = feedforward


def _bias_delta(name: str, new_bias: torch.Tensor, layer) -> torch.Tensor:
    old = layer.base_layer.bias
    if old is None:
        raise AdapterError(f"{name}: the adapter replaces a bias, but the base module has none")
    _shape(new_bias, (layer.out_features,), f"{name} bias")
    return new_bias.float() - old.detach().float().cpu()


def _base_param(wrapped, pname: str) -> torch.Tensor | None:
    try:
        return wrapped.model.get_parameter(pname)
    except AttributeError:
        return None


def _check_unwrapped_bias(name: str, parts: dict, wrapped) -> None:
    # bias="all" saves every bias of the model; loramux serves it only where it equals the base's
    old = _base_param(wrapped, f"{name}.bias")
    new = parts.get("bias")
    if old is None or new is None or tuple(new.shape) != tuple(old.shape):
        raise AdapterError(f"{name}: a bias that matches no bias of the base model")
    if not torch.equal(new.to(old.dtype), old.detach().cpu()):
        raise AdapterError(f"bias: the adapter changes the bias of {name}, which loramux cannot adapt")


def _finite(tensors: dict[str, torch.Tensor], name: str) -> None:
    for kind, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{name}: {kind} holds NaN or infinite values")
