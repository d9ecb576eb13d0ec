"""Load the frozen base model: a local Hugging Face directory or the built-in demo model.

The demo model is a small Llama trained on Python's own documentation and standard
library source, with a BPE tokenizer; scripts/train_demo.py made it, and its files
ship in the package (loramux/demo/model, with its two LoRA adapters beside it).
The tests' tiny models are built from a config with a fixed seed and a byte-level
tokenizer, so they are identical on every run. Nothing is ever downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# Special tokens take ids 0..2; byte b has id b + 3.
BYTE_VOCAB_SIZE = 256 + 3


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: every UTF-8 byte is one token, no merges, no download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable unicode char; order the vocab by byte value.
    byte_to_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    vocab.update({byte_to_char[b]: b + 3 for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD, BOS, EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )


def _bytes_to_unicode() -> list[str]:
    # GPT-2's reversible byte -> printable-char table, in byte order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    """A small Llama-style config (GQA, RoPE, SwiGLU) over the byte vocabulary."""
    cfg = dict(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_gpt2_config(**overrides: object) -> GPT2Config:
    """A small GPT-2 config (Conv1D projections, learned positions) over the byte vocabulary."""
    cfg = dict(
        vocab_size=BYTE_VOCAB_SIZE,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.1,
    )
    cfg.update(overrides)
    return GPT2Config(**cfg)


def build_from_config(config: LlamaConfig | GPT2Config, seed: int = 0) -> PreTrainedModel:
    """Random weights from a fixed seed: the same model on every run of the same torch."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        cls = GPT2LMHeadModel if isinstance(config, GPT2Config) else LlamaForCausalLM
        model = cls(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


DEMO_DIR = Path(__file__).parent / "demo"


def demo_adapter_dirs() -> dict[str, Path]:
    """The demo model's LoRA adapters (PEFT directories), by name."""
    return {p.name: p for p in sorted((DEMO_DIR / "adapters").iterdir()) if p.is_dir()}


@dataclass
class BaseModel:
    """The frozen base model, its tokenizer and where it lives."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    name: str

    @property
    def max_context(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or cfg.n_positions)

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.model.config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(table)}")
    return table[dtype]


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def load_base_model(path: str = "demo", device: str = "auto", dtype: str = "auto") -> BaseModel:
    """Load `path` (a local HF causal LM directory) or the demo model, frozen, on `device`."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    p = DEMO_DIR / "model" if path == "demo" else Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"--model {path!r} is not a model directory (no config.json)")
    # local_files_only: there is no model hub here, and a path never means a hub id.
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dt, local_files_only=True)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(p, local_files_only=True)
    name = "demo" if path == "demo" else p.name
    model = freeze(model.to(device=dev, dtype=dt))
    return BaseModel(model=model, tokenizer=tokenizer, device=dev, dtype=dt, name=name)
