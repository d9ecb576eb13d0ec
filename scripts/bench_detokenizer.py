"""Detokenization of one long reply: the incremental Detokenizer beside re-decoding the whole reply per token.

The baseline is what the engine did before (decode all ids after every token: O(n²) per
reply). Both run in this process on the same ids, with a real byte-level BPE tokenizer
trained here on the standard library's source, and the script prints their times and ratio.

    .venv/bin/python scripts/bench_detokenizer.py [--tokens 4096] [--vocab 4000]
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loramux.engine.detokenizer import Detokenizer


def stdlib_text(limit: int) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, n = [], 0
    for path in sorted(root.glob("*.py")):
        t = path.read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        n += len(t)
        if n > limit:
            break
    return "".join(parts)


def tokenizer(text: str, vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def full_redecode(tok: PreTrainedTokenizerFast, ids: list[int]) -> str:
    """The old way: the whole reply decoded again after every token."""
    text = ""
    for i in range(1, len(ids) + 1):
        text = tok.decode(ids[:i], skip_special_tokens=True)
    return text


def incremental(tok: PreTrainedTokenizerFast, ids: list[int]) -> str:
    d = Detokenizer(tok, ("\n\n\n\n",))
    out = []
    for i, t in enumerate(ids):
        d.add(t)
        out.append(d.release(i == len(ids) - 1))
    return "".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    text = stdlib_text(2_000_000)
    tok = tokenizer(text, a.vocab)
    ids = tok.encode(text[len(text) // 2 :], add_special_tokens=False)[: a.tokens]
    assert incremental(tok, ids) == full_redecode(tok, ids) == tok.decode(ids)
    times = {}
    for name, fn in (("re-decode every token (before)", full_redecode), ("incremental (now)", incremental)):
        best = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            fn(tok, ids)
            best = min(best, time.perf_counter() - t0)
        times[name] = best
        print(f"{name:>32}: {best * 1e3:9.1f} ms for {len(ids)} tokens ({best / len(ids) * 1e6:.1f} µs/token)")
    before, now = times.values()
    print(f"{'ratio':>32}: {before / now:9.1f}x")


if __name__ == "__main__":
    main()
