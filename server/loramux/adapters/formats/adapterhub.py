"""AdapterHub (`adapters` library) bottleneck adapters: adapter_config.json + adapter.safetensors.

The config file is what `save_adapter` writes: {"config": <BnConfig dict or a
"union" of them>, "name", "model_type", "hidden_size", ...}. Weight names are the
library's module paths, e.g. (Llama)
`model.layers.3.attention_adapters.adapters.NAME.adapter_down.0.weight` and (GPT-2)
`transformer.h.3.output_adapters.adapters.NAME.adapter_up.bias`.

Every option the library computes at inference is honoured; options that change
the model in ways loramux does not implement are refused by name (AdapterError).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loramux.adapters.kinds.base import AdapterError, AdapterInfo
from loramux.adapters.kinds.bottleneck import POINTS, BottleneckAdapter, BottleneckUnit, activation
from loramux.adapters.model.decoder_layers import find_decoder_layers

if TYPE_CHECKING:
    from loramux.adapters.model.wrapped import WrappedModel

# The library's location keys for our two insertion points, and its module names for them.
LOCATION_KEYS = {"attention": "mh_adapter", "output": "output_adapter"}
MODULE_NAMES = {"attention_adapters": "attention", "output_adapters": "output"}
# {layers}: the decoder layer list's attribute ("layers", GPT-2's "h"), after any model prefix.
# groups: layer index, module name, adapter name, tensor name inside the adapter
WEIGHT_NAME = r"^(?:.*\.)?{layers}\.(\d+)\.(attention_adapters|output_adapters)\.adapters\.([^.]+)\.(.+)$"

# BnConfig keys and what is supported. Training-only keys (dropout, init, stochastic
# depth) are no-ops at inference; PHM keys only matter when phm_layer is set.
PLACEMENT_KEYS = {
    "mh_adapter",
    "output_adapter",
    "reduction_factor",
    "non_linearity",
    "original_ln_before",
    "original_ln_after",
    "ln_before",
    "ln_after",
    "is_parallel",
    "scaling",
    "residual_before_ln",
    "adapter_residual_before_ln",
    "leave_out",
}
INERT_KEYS = {
    "architecture",
    "init_weights",
    "init_weights_seed",
    "dropout",
    "stochastic_depth",
    "phm_dim",
    "factorized_phm_W",
    "shared_W_phm",
    "shared_phm_rule",
    "factorized_phm_rule",
    "phm_c_init",
    "phm_init_range",
    "learn_phm",
    "hypercomplex_nonlinearity",
    "phm_rank",
    "phm_bias",
    "inv_adapter_reduction_factor",
}
# Options that must be off, and why.
REFUSED = {
    "phm_layer": "PHM (Compacter) layers are not implemented",
    "inv_adapter": "invertible adapters change the embeddings and are not implemented",
    "cross_adapter": "cross-attention adapters need an encoder-decoder model",
    "use_gating": "the gate is a mean over each sequence's positions within one forward, which depends on "
    "batching and caching, so it cannot be served consistently",
}


def _bn_configs(config: object) -> list[dict]:
    """The BnConfig dicts of a plain config or a union; refuses other architectures."""
    if isinstance(config, str):
        raise AdapterError(f"adapter config given by name ({config!r}); the full config dict is needed")
    if not isinstance(config, Mapping):
        raise AdapterError("adapter_config.json: 'config' must be an object")
    arch = config.get("architecture")
    if arch == "union":
        parts = config.get("configs")
        if not isinstance(parts, list) or not parts:
            raise AdapterError("union config without 'configs'")
        out = []
        for c in parts:
            out += _bn_configs(c)
        return out
    if arch not in (None, "bottleneck"):
        raise AdapterError(f"architecture {arch!r} is not a bottleneck adapter; not supported in this format")
    for key in REFUSED:
        if config.get(key):  # each is off when falsy (False / None)
            raise AdapterError(f"{key}={config[key]!r} is not supported: {REFUSED[key]}")
    unknown = set(config) - PLACEMENT_KEYS - INERT_KEYS - set(REFUSED)
    if unknown:
        raise AdapterError(f"unknown bottleneck config option(s): {', '.join(sorted(unknown))}")
    for key in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity"):
        if key not in config:
            raise AdapterError(f"bottleneck config is missing {key!r}")
    if config.get("residual_before_ln", True) == "post_add":
        # The library only defines post_add with a post-LN layer norm; for these models it fails.
        raise AdapterError("residual_before_ln='post_add' is not supported for pre-LN decoder models")
    return [dict(config)]


def _match(configs: list[dict], layer: int, point: str) -> dict | None:
    """The library's ModelAdaptersConfig.match: the one config at this layer and location, if any."""
    hits = [c for c in configs if c.get(LOCATION_KEYS[point]) and layer not in (c.get("leave_out") or [])]
    if len(hits) > 1:
        raise AdapterError(f"several union members place an adapter at layer {layer} {LOCATION_KEYS[point]}")
    return hits[0] if hits else None


def _bottleneck_size(rf: object, layer: int, hidden: int) -> int:
    if isinstance(rf, Mapping):
        if str(layer) in rf:
            rf = rf[str(layer)]
        elif "default" in rf:
            rf = rf["default"]
        else:
            raise AdapterError(f"reduction_factor mapping has no entry for layer {layer} and no 'default'")
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0:
        raise AdapterError(f"reduction_factor must be a positive number, got {rf!r}")
    return max(1, int(hidden // rf))  # the library's int(hidden_size // reduction_factor), at least 1


def _unit(cfg: dict, w: dict[str, torch.Tensor], where: str, hidden: int, size: int) -> BottleneckUnit:
    """Build one unit from its tensors (names relative to `...adapters.NAME.`), checking every shape."""
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...], alias: str | None = None) -> torch.Tensor:
        key = name if name in w else alias if alias in w else None
        if key is None:
            raise AdapterError(f"{where}: missing weight {name}")
        if alias in w and name in w and not torch.equal(w[name], w[alias]):
            raise AdapterError(f"{where}: {name} and {alias} name the same tensor but differ")
        used.update(k for k in (name, alias) if k in w)
        t = w[key]
        if tuple(t.shape) != shape:
            raise AdapterError(f"{where}: {key} has shape {tuple(t.shape)}, expected {shape}")
        return t

    lin = "adapter_down.1" if cfg.get("ln_before") else "adapter_down.0"
    ln_before = None
    if cfg.get("ln_before"):  # the library registers this LayerNorm under two names
        ln_before = tuple(
            take(f"adapter_down.0.{p}", (hidden,), f"adapter_norm_before.{p}") for p in ("weight", "bias")
        )
    ln_after = (
        tuple(take(f"adapter_norm_after.{p}", (hidden,)) for p in ("weight", "bias")) if cfg.get("ln_after") else None
    )
    scaling = cfg.get("scaling", 1.0)
    if scaling == "learned":
        scaling = take("scaling", (1,))
    elif scaling == "channel":
        scaling = take("scaling", (hidden,))
    elif isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise AdapterError(f"scaling must be a number, 'learned' or 'channel', got {scaling!r}")
    unit = BottleneckUnit(
        down_w=take(f"{lin}.weight", (size, hidden)),
        down_b=take(f"{lin}.bias", (size,)),
        up_w=take("adapter_up.weight", (hidden, size)),
        up_b=take("adapter_up.bias", (hidden,)),
        act=activation(str(cfg["non_linearity"])),
        scaling=float(scaling) if not isinstance(scaling, torch.Tensor) else scaling,
        ln_before=ln_before,
        ln_after=ln_after,
        is_parallel=bool(cfg.get("is_parallel", False)),
        original_ln_before=bool(cfg.get("original_ln_before", False)),
        original_ln_after=bool(cfg.get("original_ln_after", True)),
        residual_before_ln=bool(cfg.get("residual_before_ln", True)),
        adapter_residual_before_ln=bool(cfg.get("adapter_residual_before_ln", False)),
    )
    extra = set(w) - used
    if extra:
        raise AdapterError(f"{where}: weights that match no part of the config: {', '.join(sorted(extra))}")
    return unit


def parse_adapterhub(config: dict, weights_path: Path, wrapped: WrappedModel) -> BottleneckAdapter:
    """Validate an AdapterHub bottleneck adapter against the wrapped base model; CPU tensors in its dtype."""
    base_cfg = wrapped.model.config
    if not wrapped.blocks:
        raise AdapterError(
            f"bottleneck adapters are supported on llama, mistral and gpt2 base models, "
            f"not {getattr(base_cfg, 'model_type', '?')!r}"
        )
    prefix, layers = find_decoder_layers(wrapped.model)
    hidden = int(getattr(base_cfg, "hidden_size", None) or base_cfg.n_embd)
    if config.get("model_type") not in (None, base_cfg.model_type):
        raise AdapterError(f"adapter was trained on a {config['model_type']!r} model; base is {base_cfg.model_type!r}")
    if config.get("hidden_size") not in (None, hidden):
        raise AdapterError(f"adapter hidden_size {config['hidden_size']} != base model hidden size {hidden}")
    configs = _bn_configs(config.get("config"))
    name = config.get("name")

    try:
        raw = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"cannot read adapter weights as safetensors: {e}") from None
    if name is None:  # an old config without a name: the weights must name exactly one adapter
        names = {m.group(3) for k in raw if (m := re.match(WEIGHT_NAME.format(layers=r"\w+"), k))}
        if len(names) > 1:
            raise AdapterError(f"weights hold several adapters ({', '.join(sorted(names))}) and the config names none")
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    weight_name = re.compile(WEIGHT_NAME.format(layers=re.escape(prefix.rsplit(".", 1)[-1])))
    for key, t in raw.items():
        m = weight_name.match(key)
        if m is None or (name is not None and m.group(3) != name) or int(m.group(1)) >= len(layers):
            unmatched.append(key)
            continue
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise AdapterError(f"{key}: not a finite floating-point tensor")
        grouped.setdefault((int(m.group(1)), MODULE_NAMES[m.group(2)]), {})[m.group(4)] = t
    if unmatched:
        raise AdapterError(
            f"weights that match no bottleneck adapter {name!r} of this model: "
            f"{', '.join(sorted(unmatched)[:10])}{' ...' if len(unmatched) > 10 else ''}"
        )

    units: dict[tuple[int, str], BottleneckUnit] = {}
    for layer in range(len(layers)):
        for point in POINTS:
            cfg, w = _match(configs, layer, point), grouped.pop((layer, point), None)
            where = f"layer {layer} {LOCATION_KEYS[point]}"
            if cfg is None:
                if w:
                    raise AdapterError(f"{where}: weights present but the config places no adapter there")
                continue
            if w is None:
                raise AdapterError(f"{where}: the config places an adapter there but no weights were found")
            size = _bottleneck_size(cfg["reduction_factor"], layer, hidden)
            units[(layer, point)] = _unit(cfg, w, where, hidden, size).to(torch.device("cpu"), wrapped.dtype)
    if not units:
        raise AdapterError("the adapter places no bottleneck anywhere in this model")
    block_names = {p: wrapped.blocks[0].sublayer_names[p] for p in POINTS}
    return BottleneckAdapter(
        AdapterInfo(
            adapter_type="bottleneck",
            rank=max(u.size for u in units.values()),
            target_modules=[f"{prefix}.{layer}.{block_names[point]}" for layer, point in sorted(units)],
            mergeable=False,
        ),
        units,
    )
