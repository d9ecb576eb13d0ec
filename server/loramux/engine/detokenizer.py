"""Incremental detokenization with stop strings, constant work per token.

Decoding a whole reply again after every token costs O(n) per token, O(n²) per
reply, on the engine thread. Instead a stream keeps two offsets into the ids, as
vLLM and TGI do (`tokenizers`' `DecodeStream` is the same algorithm in Rust):
with `prefix = ids[p:r]` (tokens already turned into text, kept as left context
so that spaces and merges decode as they would in the whole) and the new ids
`ids[r:]`,

    chunk = decode(ids[p:]) minus decode(ids[p:r])

is released only when it is longer than the prefix text and does not end in
U+FFFD (the replacement character an incomplete UTF-8 sequence decodes to: the
rest of the character is still to come). Then p, r = r, len(ids). Each step
decodes a handful of tokens, whatever the length of the reply.

Stop strings are searched for only where a new match can be: a stop string `s`
that appears now ends in the new chunk, so it starts at most `len(s) - 1`
characters before it. The last `max(len(s)) - 1` characters are held back until
the request finishes, so the start of a stop string is never released.
"""

from __future__ import annotations

from typing import Protocol

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase


class TokenStream(Protocol):
    def step(self, token_id: int) -> str | None:
        """Add one token; the text it completes (None: nothing complete yet)."""


class _FastStream:
    """`tokenizers`' DecodeStream over a fast tokenizer's Rust `Tokenizer`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tok = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str | None:
        return self._stream.step(self._tok, token_id)


class _OffsetStream:
    """The same prefix/read-offset algorithm over any tokenizer's `decode` (slow tokenizers)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []  # ids[p:]: the left context, then the ids not yet turned into text
        self._read = 0  # r - p: where the ids not yet turned into text start in `_ids`

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def step(self, token_id: int) -> str | None:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[: self._read])
        new_text = self._decode(self._ids)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None
        # p, r = r, len(ids): ids before the new p are never decoded again.
        del self._ids[: self._read]
        self._read = len(self._ids)
        return new_text[len(prefix_text) :]


def token_stream(tokenizer: PreTrainedTokenizerBase) -> TokenStream:
    """DecodeStream for fast tokenizers; the offsets in Python for the others."""
    if getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "backend_tokenizer"):
        return _FastStream(tokenizer)
    return _OffsetStream(tokenizer)


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self._stream = token_stream(tokenizer)
        self._pending = ""  # decoded, not yet released (cut at a stop string once found)
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Add one generated token; sets `stopped` when a stop string appears."""
        if self.stopped:
            return
        chunk = self._stream.step(token_id)
        if not chunk:
            return
        before = len(self._pending)
        self._pending += chunk
        if self.stop:
            hits = [self._pending.find(s, max(0, before - len(s) + 1)) for s in self.stop]
            cut = min((i for i in hits if i >= 0), default=-1)
            if cut >= 0:
                self._pending = self._pending[:cut]
                self.stopped = True

    def release(self, final: bool) -> str:
        """The text that is final now and not yet released."""
        end = len(self._pending) if final or self.stopped else max(0, len(self._pending) - self.hold)
        out, self._pending = self._pending[:end], self._pending[end:]
        return out
