"""Configs: dataclasses validated once, at start (ValueError, never assert); CLI flags derive from their fields.

Every field is the flag `--field-name` of its type and default; `help` and `choices`
come from the field's metadata; a bool is an on-switch (`--no-name`, an off-switch, for one
that defaults to on); a nested config's fields are
flags of their own (`add_flags`, `from_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")
# How wrapped linears add plain-LoRA deltas (adapters/kinds/lora_batched.py): "segment" (the per-segment
# reference), "grouped" (pure torch: spans of the rank-bucketed stacks, read in place), "triton" (SGMV
# kernels, CUDA) or "auto" (triton on CUDA when installed, else grouped).
LORA_PATHS = ("auto", "segment", "grouped", "triton")


def _flag(default: Any, help: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class EngineConfig:
    max_running: int = 64  # requests holding KV blocks at once (prefilling or decoding)
    max_batch_tokens: int = _flag(
        0, "a step's budget in tokens, prompt chunks at their cost (engine/step_cost.py; 0 = 512 on CUDA, 128 on CPU)"
    )
    max_queue: int = 1024  # waiting requests; beyond it new ones get RESOURCE_EXHAUSTED
    max_model_len: int = 0  # prompt + output tokens per request; 0 = the model's context (capped at 4096)
    default_max_new_tokens: int = 128
    max_device_adapters: int = 32  # device slots (each holds only its adapter's weights)
    host_cache_mb: float = 1024.0  # host-memory tier budget
    merged_cache_mb: float = 0.0  # merged W0+BA budget; 0 turns the merged path off
    merge_threshold: float = 0.5  # share of recent tokens that makes an adapter hot
    merge_window_tokens: int = 4096  # how many recent tokens the hot policy looks at
    kv_cache_mb: float = _flag(0.0, "the KV block pool, K and V of every layer (0 = half the free memory, capped)")
    block_size: int = _flag(16, "tokens per KV block")
    prefix_caching: bool = _flag(True, "do not reuse the KV blocks of an identical prefix (on by default)")
    compile: bool = _flag(True, "do not compile the decode step at start-up (torch.compile); every step runs eager")
    lora_path: str = _flag("auto", "how LoRA deltas are computed (auto: triton on CUDA, else grouped)", LORA_PATHS)

    def validate(self) -> None:
        _positive("max_running", self.max_running)
        _positive("max_batch_tokens", self.max_batch_tokens, allow_zero=True)
        _positive("max_queue", self.max_queue)
        _positive("max_model_len", self.max_model_len, allow_zero=True)
        _positive("default_max_new_tokens", self.default_max_new_tokens)
        _positive("max_device_adapters", self.max_device_adapters)
        _positive("host_cache_mb", self.host_cache_mb, allow_zero=True)
        _positive("merged_cache_mb", self.merged_cache_mb, allow_zero=True)
        _positive("merge_window_tokens", self.merge_window_tokens)
        _positive("kv_cache_mb", self.kv_cache_mb, allow_zero=True)
        _positive("block_size", self.block_size)
        if self.block_size > 1024:
            raise ValueError(f"block_size must be at most 1024, got {self.block_size}")
        if self.lora_path not in LORA_PATHS:
            raise ValueError(f"lora_path must be one of {', '.join(LORA_PATHS)}, got {self.lora_path!r}")
        if not 0.0 < self.merge_threshold <= 1.0:
            raise ValueError(f"merge_threshold must be in (0, 1], got {self.merge_threshold}")


def default_batch_tokens(device_type: str) -> int:
    """--max-batch-tokens 0: a step budget that keeps decoding streams steady while long prompts arrive.

    Prompt chunks are charged by their context (engine/step_cost.py), so every step that
    carries a chunk costs about the decodes plus the rest of the budget. On a CPU (the
    bench's chunked suite, --threads 1) 128 makes such a step of 16 decodes about 2.5 times
    a step of the decodes alone and the streams' per-token p99 / p50 about 1.3 while
    2,000-token prompts arrive; 64 made the chunks so small deep into a prompt (the gather of
    its context is most of their cost) that the window took twice the steps, the decodes'
    own attention grew with it, and the ratio was higher (README, Chunked prefill). On a GPU
    a step stays launch-bound up to a few hundred tokens.
    """
    return 512 if device_type == "cuda" else 128


@dataclass
class ServerConfig:
    model: str = _flag("demo", "a local Hugging Face model directory, or 'demo'")
    store: Path = _flag(Path("adapters_store"), "adapter store directory")
    host: str = "127.0.0.1"
    port: int = _flag(50051, "gRPC port (0 = pick a free one)")
    metrics_port: int = _flag(9090, "Prometheus port (0 = pick a free one)")
    metrics_host: str = _flag("", "metrics bind address (default: --host)")  # "" = same as host
    device: str = _flag("auto", choices=("auto", "cpu", "cuda"))
    dtype: str = _flag("auto", choices=("auto", "float32", "bfloat16", "float16"))
    admin_token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_adapter_mb: float = 512.0
    max_message_mb: int = 64
    drain_timeout: float = 30.0
    log_format: str = _flag("text", choices=("text", "json"))
    log_prompts: bool = _flag(False, "include prompt text in request logs")
    metrics_max_adapter_labels: int = 20
    http_port: int = _flag(8000, "OpenAI-compatible HTTP API port (0 = pick a free one, -1 = off)")
    api_key_file: Path | None = _flag(None, "a file with the Bearer key the HTTP API requires (vLLM's --api-key)")
    served_model_name: str = _flag("", "the base model's id over HTTP (default: the model directory's name)")
    allowed_adapter_dir: Path | None = _flag(
        None, "the directory /v1/load_lora_adapter may load from (unset: that endpoint is off)"
    )
    threads: int = _flag(0, "torch threads (0 = one less than the available cores: the server's own threads need one)")
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        for name, port in (("--port", self.port), ("--metrics-port", self.metrics_port)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {port}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"--http-port must be in 0..65535, or -1 (off), got {self.http_port}")
        if self.api_key_file is not None and not Path(self.api_key_file).is_file():
            raise ValueError(f"--api-key-file {self.api_key_file} does not exist")
        if self.allowed_adapter_dir is not None and not Path(self.allowed_adapter_dir).is_dir():
            raise ValueError(f"--allowed-adapter-dir {self.allowed_adapter_dir} is not a directory")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"--log-format must be text or json, got {self.log_format!r}")
        _positive("--max-adapter-mb", self.max_adapter_mb)
        _positive("--max-message-mb", self.max_message_mb)
        _positive("--drain-timeout", self.drain_timeout, allow_zero=True)
        _positive("--metrics-max-adapter-labels", self.metrics_max_adapter_labels, allow_zero=True)
        _positive("--threads", self.threads, allow_zero=True)
        if self.admin_token_file is not None and not Path(self.admin_token_file).is_file():
            raise ValueError(f"--admin-token-file {self.admin_token_file} does not exist")
        self.engine.validate()


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the config dataclass `cls` (and of the configs nested in it)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            add_flags(parser, kind)
            continue
        name = "--" + f.name.replace("_", "-")
        meta = {k: v for k, v in f.metadata.items() if v is not None}
        if kind is bool:  # an on-switch; a field that defaults to on gets an off-switch, --no-<name>
            if f.default is True:
                parser.add_argument("--no-" + name[2:], dest=f.name, action="store_false", **meta)
            else:
                parser.add_argument(name, action="store_true", **meta)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None -> X
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if "choices" in meta:
            meta["choices"] = list(meta["choices"])
        parser.add_argument(name, type=None if base is str else base, default=default, **meta)


def from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config `cls` with every field taken from the flags `add_flags` made."""
    hints = typing.get_type_hints(cls)
    values = {
        f.name: from_args(hints[f.name], args) if dataclasses.is_dataclass(hints[f.name]) else getattr(args, f.name)
        for f in dataclasses.fields(cls)
    }
    return cls(**values)
