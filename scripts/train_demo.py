"""Train the demo model and its two LoRA adapters from text every Python installation has.

- Tokenizer: a byte-level BPE (GPT-2's kind) of 2048 tokens, trained on both corpora.
- Base model: a small Llama (2 layers, hidden 128, about 0.69M parameters), trained on an
  even mix of both.
- Two PEFT LoRAs on it: `python-code` on the standard library's source, `english-prose`
  on the prose paragraphs of Python's own documentation (pydoc_data.topics, the text
  of `help()`).

The results are committed under server/loramux/demo/ (the base in float16, under 2 MB in
all), so `loramux serve` serves a model that writes words, and `make demo` shows the
same prompt completed in three styles. Torch's thread count is fixed (--threads), and
every seed too. On a shared 2-core machine the whole run takes about 14 minutes.

    .venv/bin/python scripts/train_demo.py [--out server/loramux/demo] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sysconfig
import time
from pathlib import Path
from pydoc_data.topics import topics

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SEEDS = {"base": 1, "python-code": 2, "english-prose": 3}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prose_text() -> str:
    """The prose paragraphs of Python's documentation topics (the text of `help()`), in a fixed order.

    A paragraph is kept when no line of it is indented (indented blocks are code and
    grammar) and it is mostly letters and spaces, so the prose adapter learns sentences.
    """
    paras = [p.strip("\n") for k in sorted(topics) for p in re.split(r"\n\s*\n", topics[k])]
    keep = [
        p for p in paras
        if not any(line.startswith("   ") for line in p.splitlines())
        and sum(c.isalpha() or c == " " for c in p) > 0.8 * len(p)
    ]  # fmt: skip
    return "\n\n".join(keep)


def code_text(limit: int = 600_000) -> str:
    """Standard library modules, in name order, until `limit` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, n = [], 0
    for path in sorted(root.glob("*.py")):
        if path.name.startswith("_"):
            continue
        t = path.read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        n += len(t)
        if n >= limit:
            break
    return "\n\n".join(parts)


def train_tokenizer(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[PAD, BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )


def model_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def batches(data: list[torch.Tensor], steps: int, batch: int, seq: int, seed: int):  # noqa: ANN201
    """`steps` batches [batch, seq + 1] of random windows, drawn evenly from each corpus in `data`."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = []
        for i in range(batch):
            ids = data[i % len(data)]
            start = int(torch.randint(0, len(ids) - seq - 1, (1,), generator=gen))
            rows.append(ids[start : start + seq + 1])
        yield torch.stack(rows)


def train(model: torch.nn.Module, data: list[torch.Tensor], steps: int, lr: float, what: str, a) -> None:  # noqa: ANN001
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    model.train()
    t0 = time.perf_counter()
    for step, xb in enumerate(batches(data, steps, a.batch, a.seq, seed=SEEDS[what])):
        loss = _loss(model, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            took = time.perf_counter() - t0
            print(f"{what}: step {step + 1}/{steps} loss {loss.item():.3f} ({took:.0f}s)", flush=True)
    model.eval()


def _loss(model: torch.nn.Module, xb: torch.Tensor) -> torch.Tensor:
    # xb: [batch, seq + 1]; predict token t + 1 from tokens ..t
    logits = model(input_ids=xb[:, :-1]).logits  # [batch, seq, vocab]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), xb[:, 1:].flatten())


def tidy_adapter_dir(d: Path) -> None:
    """Drop PEFT's empty model card; name the base "demo" rather than the path it was trained from."""
    (d / "README.md").unlink(missing_ok=True)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(base_model_name_or_path="demo", task_type="CAUSAL_LM")
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "server/loramux/demo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--base-steps", type=int, default=500)
    ap.add_argument("--lora-steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    prose, code = prose_text(), code_text()
    tok = train_tokenizer([prose, code], a.vocab)
    ids = {k: torch.tensor(tok.encode(t, add_special_tokens=False)) for k, t in (("prose", prose), ("code", code))}
    print({k: len(v) for k, v in ids.items()}, "tokens", flush=True)

    model = LlamaForCausalLM(model_config(len(tok)))
    print(f"base model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    train(model, [ids["prose"], ids["code"]], a.base_steps, 1e-2, "base", a)
    base_dir = a.out / "model"
    model.to(torch.float16).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model.to(torch.float32)

    for name, corpus in (("python-code", "code"), ("english-prose", "prose")):
        base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0))
        train(lora, [ids[corpus]], a.lora_steps, 1e-2, name, a)
        lora.save_pretrained(str(a.out / "adapters" / name))
        tidy_adapter_dir(a.out / "adapters" / name)
    print(f"written under {a.out} ({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
