"""Make the AdapterHub reference fixtures that tests/test_adapterhub.py checks loramux against.

Runs in the separate `.venv-adapterhub` environment (the `adapters` library pins
transformers 4.57, which loramux cannot depend on):

    .venv-adapterhub/bin/python scripts/make_adapterhub_fixtures.py [--out tests/fixtures/adapterhub]

For each tiny base model it saves the base weights and config (the tests load these,
never rebuild them, since transformers 4.x and 5.x may initialise differently). For
each bottleneck kind it adds an adapter with the library, fills every adapter
parameter with noise (the library zero-initialises adapter_up, which would make the
adapter a no-op), saves it with `save_adapter(..., use_safetensors=True)` and records,
with the library doing the forward: the last-position logits over a few fixed prompts
and greedy tokens (full re-forward per step, no cache).

Base weights are rounded to float16 values before anything runs, so the committed
file is half the size; both sides compute in float32 on exactly those values.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import adapters
import torch
from adapters import ConfigUnion, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

# Byte tokenizer of loramux.model: byte b has id b + 3 (0..2 are pad, bos, eos).
PROMPTS = ["Hello", "The quick brown fox", "a", "loramux 123!"]
GREEDY_STEPS = 8
# Adapter noise per base: strong enough to change greedy tokens, not so strong that one token repeats.
NOISE_STD = {"llama": 0.2, "gpt2": 0.05}
SEED = 0

# The same tiny configs as loramux.model.tiny_llama_config / tiny_gpt2_config, spelled out
# here so this script needs nothing from the main environment (n_positions kept small).
LLAMA = dict(
    vocab_size=259,
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
GPT2 = dict(
    vocab_size=259,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.1,
)


def llama_adapters() -> dict[str, object]:
    return {
        "seq_bn": SeqBnConfig(reduction_factor=16),
        "double_seq_bn": DoubleSeqBnConfig(reduction_factor=8),
        "par_bn": ParBnConfig(reduction_factor=4),
        # Hybrid: series at the attention output, parallel beside the feed-forward.
        "hybrid": ConfigUnion(
            SeqBnConfig(mh_adapter=True, output_adapter=False, reduction_factor=16),
            ParBnConfig(mh_adapter=False, output_adapter=True, reduction_factor=8, scaling=2.0),
        ),
        "seq_bn_opts": SeqBnConfig(
            ln_before=True,
            ln_after=True,
            non_linearity="gelu",
            scaling="channel",
            reduction_factor={"1": 8, "default": 16},
        ),
        # Houlsby with a learned scalar scale, the residual inside the adapter LN, one layer left out.
        "double_seq_bn_opts": DoubleSeqBnConfig(
            reduction_factor=8,
            scaling="learned",
            ln_after=True,
            adapter_residual_before_ln=True,
            leave_out=[1],
        ),
        # AdapterPlus-like placement: original residual before, not after; residual taken after the add.
        "seq_bn_no_ln_after": SeqBnConfig(
            original_ln_after=False,
            residual_before_ln=False,
            non_linearity="leakyrelu",
            reduction_factor=16,
        ),
        "par_bn_opts": ParBnConfig(reduction_factor=8, ln_before=True, ln_after=True, non_linearity="tanh"),
    }


def gpt2_adapters() -> dict[str, object]:
    return {
        "double_seq_bn": DoubleSeqBnConfig(reduction_factor=8),
        "hybrid": ConfigUnion(
            ParBnConfig(mh_adapter=True, output_adapter=False, reduction_factor=8),
            SeqBnConfig(mh_adapter=False, output_adapter=True, reduction_factor=16, non_linearity="gelu_new"),
        ),
    }


def prompt_ids() -> list[list[int]]:
    return [[b + 3 for b in p.encode()] for p in PROMPTS]


def build_base(kind: str) -> PreTrainedModel:
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)) if kind == "llama" else GPT2LMHeadModel(GPT2Config(**GPT2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


def save_base(model: PreTrainedModel, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(out / "config.json")
    # Tied weights (GPT-2's lm_head) are saved once, as from_pretrained expects.
    state = {
        k: v.half().contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight" or not model.config.tie_word_embeddings
    }
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


@torch.no_grad()
def record(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Last-position logits per prompt, and greedy tokens by full re-forward (no cache)."""
    logits, greedy = [], []
    for ids in prompt_ids():
        seq = list(ids)
        out = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        logits.append(out.float())
        steps = []
        for _ in range(GREEDY_STEPS):
            nxt = int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
            steps.append(nxt)
            seq.append(nxt)
        greedy.append(steps)
    return {"last_logits": torch.stack(logits).contiguous(), "greedy": torch.tensor(greedy, dtype=torch.int64)}


@torch.no_grad()
def randomize(model: PreTrainedModel, name: str, gen: torch.Generator, std: float) -> int:
    """Noise into every parameter of adapter `name`; norms and scales around 1 so they stay sensible."""
    n = 0
    for pname, p in model.named_parameters():
        if f".adapters.{name}." not in pname:
            continue
        noise = torch.randn(p.shape, generator=gen) * std
        # LayerNorm weights (adapter_norm_before / _after) and learned scales: around 1.
        around_one = ("adapter_norm" in pname and pname.endswith("weight")) or pname.endswith("scaling")
        p.copy_(noise + 1.0 if around_one else noise)
        n += 1
    return n


def save_adapter(model: PreTrainedModel, out: Path, name: str) -> None:
    """`save_adapter` as safetensors, without the prediction head.

    With ln_before the library registers one LayerNorm under two names
    (adapter_norm_before and adapter_down.0), and its safetensors save refuses the
    shared storage. Such adapters are saved the torch way and converted here,
    keeping only the adapter_down.* names (loramux accepts either spelling).
    """
    try:
        model.save_adapter(str(out), name, with_head=False, use_safetensors=True)
        return
    except RuntimeError as e:
        if "share memory" not in str(e):
            raise
    model.save_adapter(str(out), name, with_head=False, use_safetensors=False)
    state = torch.load(out / "pytorch_adapter.bin", weights_only=True)
    state = {k: v.clone().contiguous() for k, v in state.items() if ".adapter_norm_before." not in k}
    save_file(state, out / "adapter.safetensors", metadata={"format": "pt"})
    (out / "pytorch_adapter.bin").unlink()


def make(kind: str, configs: dict[str, object], root: Path) -> None:
    base = build_base(kind)
    save_base(base, root / kind / "base")
    save_file(record(base), root / kind / "base" / "expected.safetensors")
    adapters.init(base)
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(SEED + i)
        base.add_adapter(name, config=config)
        n = randomize(base, name, torch.Generator().manual_seed(1000 + i), NOISE_STD[kind])
        if n == 0:
            raise RuntimeError(f"adapter {name} has no parameters to randomize")
        base.set_active_adapters(name)
        base.eval()
        out = root / kind / name
        save_adapter(base, out, name)
        expected = record(base)
        save_file(expected, out / "expected.safetensors")
        base.set_active_adapters(None)
        base.delete_adapter(name)
        print(f"{kind}/{name}: {n} tensors, greedy {expected['greedy'].tolist()[:2]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/adapterhub"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # the same reduction order on every run
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    (args.out / "prompts.json").write_text(
        json.dumps({"prompts": PROMPTS, "token_ids": prompt_ids(), "greedy_steps": GREEDY_STEPS}, indent=1) + "\n"
    )
    make("llama", llama_adapters(), args.out)
    make("gpt2", gpt2_adapters(), args.out)


if __name__ == "__main__":
    main()
