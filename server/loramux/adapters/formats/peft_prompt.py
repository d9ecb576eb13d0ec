"""PEFT prompt learning (PROMPT_TUNING, P_TUNING, PREFIX_TUNING) as `save_pretrained` writes it.

PEFT saves what its inference uses: one tensor, `prompt_embeddings`, already run
through any prompt encoder (p-tuning's MLP / LSTM, prefix tuning's projection).
Shapes: [N, token_dim] for prompt tuning and p-tuning (token_dim = hidden size),
[N, num_layers * 2 * token_dim] for prefix tuning, where token_dim = kv_heads *
head_dim (PEFT sizes the prefix for the key/value heads under GQA).

A file holding the prompt encoder's own weights instead (a PeftModel state dict:
`prompt_encoder.<name>.embedding.weight`, `.mlp_head.*`, `.lstm_head.*`,
`.transform.*`) is accepted too: the encoder runs once here, on the CPU in
float32, exactly as PEFT's `get_prompt` would run it, and only its output is kept.

Everything is checked against the base model: a config or a tensor sized for
another model is refused with the field that does not fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loramux.adapters.formats.tensors import read_safetensors
from loramux.adapters.kinds.base import AdapterError, AdapterInfo
from loramux.adapters.kinds.soft_prompt import SoftPrompt

PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")

# Fields that never change inference (bookkeeping; init-only: the weights are saved).
_COMMON = {
    "peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
    "num_layers", "modules_to_save",
}  # fmt: skip
_FIELDS = {
    "PROMPT_TUNING": _COMMON | {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                                "tokenizer_kwargs"},
    "P_TUNING": _COMMON | {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers",
                           "encoder_dropout"},
    "PREFIX_TUNING": _COMMON | {"encoder_hidden_size", "prefix_projection", "init_weights"},
}  # fmt: skip
_ENCODER_PARTS = ("embedding", "mlp_head", "lstm_head", "transform")


def parse_peft_prompt(config: dict, weights_path: Path, wrapped) -> SoftPrompt:  # wrapped: WrappedModel
    """Validate a PEFT prompt-learning adapter against `wrapped`; its virtual tokens or prefix, in host memory."""
    peft_type = config.get("peft_type")
    if peft_type == "MULTITASK_PROMPT_TUNING":
        raise AdapterError("MULTITASK_PROMPT_TUNING needs per-request task ids, which loramux does not take")
    if peft_type not in PROMPT_TYPES:
        raise AdapterError(f"peft_type {peft_type!r} is not PROMPT_TUNING, P_TUNING or PREFIX_TUNING")
    _check_fields(config, _FIELDS[peft_type])
    n = _positive_int(config, "num_virtual_tokens")
    geo = _Geometry(wrapped)
    is_prefix = peft_type == "PREFIX_TUNING"
    # PEFT's token_dim: the hidden size, or for prefix tuning kv_heads * head_dim (one layer's key or value)
    token_dim = geo.kv_heads * geo.head_dim if is_prefix else geo.hidden
    heads = geo.kv_heads if is_prefix else geo.heads
    for key, want in (("token_dim", token_dim), ("num_layers", geo.layers), ("num_attention_heads", heads)):
        got = config.get(key)
        if got is not None and got != want:
            raise AdapterError(
                f"adapter_config.json {key}={got!r} does not fit the base model ({key} should be {want}): "
                "this adapter was made for another model"
            )
    out_dim = geo.layers * 2 * token_dim if is_prefix else token_dim

    tensors = read_safetensors(weights_path)
    if "prompt_embeddings" in tensors:
        extra = sorted(set(tensors) - {"prompt_embeddings"})
        if extra:
            raise AdapterError(f"unexpected tensors next to prompt_embeddings: {extra[:5]}")
        values = tensors["prompt_embeddings"].float()
    else:
        values = _run_encoder(peft_type, config, _encoder_weights(tensors), n, token_dim, out_dim)
    if tuple(values.shape) != (n, out_dim):
        raise AdapterError(
            f"prompt_embeddings has shape {tuple(values.shape)}, but num_virtual_tokens={n} and this base model "
            f"need {(n, out_dim)}"
        )
    # PEFT casts the prompts / past key values to the base model's dtype; so do we, then refuse NaN / inf.
    values = values.to(dtype=wrapped.dtype).contiguous()
    if not bool(torch.isfinite(values).all()):
        raise AdapterError(f"prompt_embeddings hold NaN or infinite values (in {wrapped.dtype})")
    info = AdapterInfo(adapter_type="prefix" if is_prefix else "prompt", rank=n, target_modules=[], mergeable=False)
    if not is_prefix:
        return SoftPrompt(info, embeddings=values)  # [N, hidden]
    # PEFT: view [N, layers * 2, kv_heads, head_dim], permute to [layers * 2, kv_heads, N, head_dim],
    # split in pairs: layer l's key is row 2l, its value row 2l + 1.
    prefix = values.view(n, geo.layers, 2, geo.kv_heads, geo.head_dim).permute(1, 2, 3, 0, 4).contiguous()
    return SoftPrompt(info, prefix=prefix)  # [layers, 2, kv_heads, N, head_dim]


class _Geometry:
    """The base model's sizes that a prompt-learning config must match."""

    def __init__(self, wrapped) -> None:
        cfg = wrapped.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.hidden = int(wrapped.model.get_input_embeddings().weight.shape[1])
        self.layers = int(cfg.num_hidden_layers)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)


def _check_fields(config: dict, allowed: set[str]) -> None:
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise AdapterError(
            f"adapter_config.json has fields {unknown}, unknown to loramux; refusing rather than guessing"
        )
    if config.get("modules_to_save"):
        raise AdapterError(f"adapter_config.json sets modules_to_save={config['modules_to_save']!r}, not supported")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"task_type {config.get('task_type')!r}: loramux serves causal LMs (CAUSAL_LM)")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise AdapterError("num_transformer_submodules must be 1 (a decoder-only model)")


def _positive_int(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterError(f"{key} must be a positive integer, got {value!r}")
    return value


def _encoder_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prompt-encoder weights keyed from the encoder (`embedding.weight`, `mlp_head.0.weight`, ...)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key.split("prompt_encoder.", 1)[1] if "prompt_encoder." in key else key
        parts = name.split(".")
        if parts[0] not in _ENCODER_PARTS and len(parts) > 1 and parts[1] in _ENCODER_PARTS:
            parts = parts[1:]  # prompt_encoder.<adapter name>.embedding.weight
        if parts[0] not in _ENCODER_PARTS:
            raise AdapterError(f"{key} is neither prompt_embeddings nor a prompt-encoder weight")
        out[".".join(parts)] = t.float()
    if "embedding.weight" not in out:
        raise AdapterError("the weights hold neither prompt_embeddings nor the prompt encoder's embedding.weight")
    return out


@torch.no_grad()
def _run_encoder(
    peft_type: str, config: dict, w: dict[str, torch.Tensor], n: int, token_dim: int, out_dim: int
) -> torch.Tensor:
    """The encoder's output for the N virtual tokens, as PEFT computes it outside inference mode: [N, out_dim]."""
    emb = w.pop("embedding.weight")  # [N, token_dim] (prefix without projection: [N, out_dim])
    if emb.shape[0] != n:
        raise AdapterError(f"embedding.weight has {emb.shape[0]} rows, but num_virtual_tokens={n}")
    if peft_type == "PROMPT_TUNING":
        out = emb
    elif peft_type == "P_TUNING":
        hidden = config.get("encoder_hidden_size") or token_dim
        kind = config.get("encoder_reparameterization_type", "MLP")
        if kind == "MLP":
            mlp = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                nn.Linear(hidden, token_dim))  # fmt: skip
            out = _load(mlp, w, "mlp_head")(emb)
        elif kind == "LSTM":
            layers = config.get("encoder_num_layers", 2)
            lstm = nn.LSTM(token_dim, hidden, num_layers=layers, bidirectional=True, batch_first=True)
            mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim))
            out = _load(mlp, w, "mlp_head")(_load(lstm, w, "lstm_head")(emb[None])[0][0])
        else:
            raise AdapterError(f"encoder_reparameterization_type {kind!r} is not MLP or LSTM")
    elif config.get("prefix_projection"):
        hidden = config.get("encoder_hidden_size") or token_dim
        transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))
        out = _load(transform, w, "transform")(emb)
    else:
        out = emb  # prefix tuning without projection: the embedding is the prefix itself
    if w:
        raise AdapterError(f"prompt-encoder weights that {peft_type} with this config does not use: {sorted(w)[:5]}")
    return out


def _load(module: nn.Module, w: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """Load `prefix.*` from `w` (consumed) into `module`, strictly; shape problems are AdapterErrors."""
    sub = {k[len(prefix) + 1 :]: w.pop(k) for k in list(w) if k.startswith(prefix + ".")}
    try:
        module.load_state_dict(sub, strict=True)
    except RuntimeError as e:
        raise AdapterError(f"prompt encoder {prefix}: {e}") from e
    for p in module.parameters():
        if not bool(torch.isfinite(p).all()):
            raise AdapterError(f"prompt encoder {prefix} holds NaN or infinite values")
    return module.eval()
