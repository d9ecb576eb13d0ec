"""Real tokenizers trained inside the tests (nothing downloaded), in the two families real models use.

- `byte_level_bpe`: GPT-2's kind. Every byte is a symbol, so a character outside the merges
  (CJK, emoji) is several tokens, each of which alone decodes to U+FFFD.
- `metaspace_byte_fallback`: Llama 2's kind (SentencePiece BPE). Words carry a leading "▁",
  and a character outside the vocabulary becomes `<0xNN>` byte tokens, fused back by the decoder.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Café, naïve, résumé and façade are French loanwords; Zürich and Ångström are not. ",
    "def main(argv):\n    return sum(x * x for x in argv)\n",
    "Streams of text arrive one token at a time, and the server must never cut a character in two. ",
] * 20

SPECIALS = ["<unk>", "<s>", "</s>"]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )


def byte_level_bpe(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return _wrap(tok)


def metaspace_byte_fallback(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # Only the corpus' own characters are symbols: everything else (CJK, emoji) falls back to bytes.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS)
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    return _wrap(Tokenizer.from_str(json.dumps(spec)))
