"""Synthetic models and adapters with random weights, written in the formats loramux serves.

Everything here is deterministic from a seed, so two runs of the bench measure the
same model and the same adapters. Adapters are written file by file (PEFT and
AdapterHub layouts) rather than through PEFT, because writing 1000 of them through
`get_peft_model` would take longer than the benchmark itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from loramux.model import build_from_config, byte_tokenizer, tiny_llama_config

# name -> (Llama config overrides, device, dtype). Sizes are chosen so that a full
# `loramux bench` finishes in minutes on 2 CPU cores, and so that adapter arithmetic
# (rank 16 on q, k, v, o over hidden 512) is visible against the base model.
PRESETS: dict[str, tuple[dict, str, str]] = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2), "cpu", "float32"),
    "cpu": (
        dict(
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        ),
        "cpu",
        "float32",
    ),
    # TinyLlama-1.1B's shape over the byte vocabulary: about 1.0B parameters.
    "gpu-1b": (
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
        "cuda",
        "bfloat16",
    ),
}


def write_synthetic_model(preset: str, directory: Path, seed: int = 0) -> Path:
    """A random-weight Llama of the preset's shape, saved as a model directory with the byte tokenizer."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    directory.mkdir(parents=True, exist_ok=True)
    overrides, _device, dtype = PRESETS[preset]
    model = build_from_config(tiny_llama_config(**overrides), seed=seed)
    # Saved in the dtype it is served in: a 1B model in bfloat16 is 2 GB on disk, not 4.
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


@dataclass
class ModelShape:
    """What adapter files need to know about a base model: its projections' shapes and layout."""

    linears: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    vocab_size: int
    model_class: str
    model_type: str
    num_params: int = 0
    layer_prefix: str = "model.layers"  # where AdapterHub names the decoder layers (Llama layout)
    config: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model_dir: Path) -> ModelShape:
        """Read the shapes from a meta-device copy of the model: nothing is allocated or loaded."""
        cfg: PretrainedConfig = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        linears = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                linears[name] = (mod.in_features, mod.out_features)
            elif isinstance(mod, Conv1D):
                linears[name] = (mod.weight.shape[0], mod.weight.shape[1])
        return cls(
            linears=linears,
            hidden_size=int(cfg.hidden_size),
            num_layers=int(cfg.num_hidden_layers),
            num_attention_heads=int(cfg.num_attention_heads),
            vocab_size=int(cfg.vocab_size),
            model_class=type(model).__name__,
            model_type=str(cfg.model_type),
            num_params=sum(p.numel() for p in model.parameters()),
            config=cfg.to_dict(),
        )

    def targets(self, suffixes: list[str]) -> list[str]:
        found = [n for n in self.linears if n.rsplit(".", 1)[-1] in suffixes]
        if not found:
            raise ValueError(f"no module of the model ends in any of {suffixes}")
        return found


@dataclass
class AdapterSpec:
    """One synthetic adapter: its kind and size."""

    adapter_id: str
    kind: str = "lora"  # lora | dora | ia3 | bottleneck | soft_prompt
    rank: int = 16  # LoRA/DoRA rank; bottleneck width; soft-prompt virtual tokens
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    seed: int = 0

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {self.rank}")


def write_adapter(spec: AdapterSpec, shape: ModelShape, directory: Path) -> Path:
    """Write `spec` as an adapter directory (config + safetensors) under `directory/<id>`."""
    spec.validate()
    out = directory / spec.adapter_id
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(spec.seed)
    config, tensors, weights_name = KINDS[spec.kind](spec, shape, gen)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / weights_name))
    return out


def _noise(gen: torch.Generator, *shape: int, std: float = 0.02) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _peft_lora(spec: AdapterSpec, shape: ModelShape, gen: torch.Generator) -> tuple[dict, dict, str]:
    targets = shape.targets(list(spec.targets))
    tensors = {}
    for name in targets:
        fan_in, fan_out = shape.linears[name]
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = _noise(gen, spec.rank, fan_in)
        tensors[f"{key}.lora_B.weight"] = _noise(gen, fan_out, spec.rank)
        if spec.kind == "dora":
            tensors[f"{key}.lora_magnitude_vector"] = 1.0 + _noise(gen, fan_out, std=0.1)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": 2 * spec.rank,
        "target_modules": sorted(set(spec.targets)),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": spec.kind == "dora",
        "inference_mode": True,
        "init_lora_weights": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return config, tensors, "adapter_model.safetensors"


def _peft_ia3(spec: AdapterSpec, shape: ModelShape, gen: torch.Generator) -> tuple[dict, dict, str]:
    feedforward = {"down_proj", "fc2", "c_proj"} & set(spec.targets)
    tensors = {}
    for name in shape.targets(list(spec.targets)):
        fan_in, fan_out = shape.linears[name]
        ff = name.rsplit(".", 1)[-1] in feedforward
        # PEFT scales the input of feed-forward modules and the output of the others.
        tensors[f"base_model.model.{name}.ia3_l"] = 1.0 + _noise(gen, *((1, fan_in) if ff else (fan_out, 1)), std=0.1)
    config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "target_modules": sorted(set(spec.targets)),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_ia3_weights": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,
    }
    return config, tensors, "adapter_model.safetensors"


def _soft_prompt(spec: AdapterSpec, shape: ModelShape, gen: torch.Generator) -> tuple[dict, dict, str]:
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": spec.rank,
        "token_dim": shape.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": shape.num_attention_heads,
        "num_layers": shape.num_layers,
        "prompt_tuning_init": "RANDOM",
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    tensors = {"prompt_embeddings": _noise(gen, spec.rank, shape.hidden_size, std=0.1)}
    return config, tensors, "adapter_model.safetensors"


# A series (Pfeiffer) bottleneck after the feed-forward sublayer, as AdapterHub's SeqBnConfig writes it.
_SEQ_BN = {
    "adapter_residual_before_ln": False,
    "cross_adapter": False,
    "dropout": 0.0,
    "inv_adapter": None,
    "is_parallel": False,
    "leave_out": [],
    "ln_after": False,
    "ln_before": False,
    "mh_adapter": False,
    "non_linearity": "relu",
    "original_ln_after": True,
    "original_ln_before": True,
    "output_adapter": True,
    "phm_layer": False,
    "residual_before_ln": True,
    "scaling": 1.0,
    "use_gating": False,
}
_BN_NAME = "bench"


def _bottleneck(spec: AdapterSpec, shape: ModelShape, gen: torch.Generator) -> tuple[dict, dict, str]:
    h, width = shape.hidden_size, spec.rank
    if h % width:
        raise ValueError(f"bottleneck width {width} must divide the hidden size {h}")
    tensors = {}
    for i in range(shape.num_layers):
        key = f"{shape.layer_prefix}.{i}.output_adapters.adapters.{_BN_NAME}"
        tensors[f"{key}.adapter_down.0.weight"] = _noise(gen, width, h)
        tensors[f"{key}.adapter_down.0.bias"] = _noise(gen, width)
        tensors[f"{key}.adapter_up.weight"] = _noise(gen, h, width)
        tensors[f"{key}.adapter_up.bias"] = _noise(gen, h)
    config = {
        "config": {**_SEQ_BN, "reduction_factor": h // width},
        "hidden_size": h,
        "model_class": shape.model_class,
        "model_name": "",
        "model_type": shape.model_type,
        "name": _BN_NAME,
        "version": "adapters.1.3.0",
    }
    return config, tensors, "adapter.safetensors"


KINDS = {
    "lora": _peft_lora,
    "dora": _peft_lora,
    "ia3": _peft_ia3,
    "bottleneck": _bottleneck,
    "soft_prompt": _soft_prompt,
}
