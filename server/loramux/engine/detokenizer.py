"""Incremental detokenization with stop strings.

Text is released only when it is final: never half a UTF-8 character, and never
the start of what may become a stop string (the stop text itself is not returned).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the decoded text so far (cut at a stop string once found)
        self.emitted = 0  # characters of `text` already released
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Add one generated token; sets `stopped` when a stop string appears."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            # Only the tail can hold a new match: a stop string ends in the new text.
            begin = max(0, len(self.text) - self.hold - 1)
            cut = min((i for i in (text.find(s, begin) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                self.stopped = True
        self.text = text

    def release(self, final: bool) -> str:
        """The text that is final now and not yet released."""
        end = len(self.text)
        if not final:
            # An incomplete UTF-8 sequence decodes to U+FFFD at the end: wait for the rest.
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
            end = max(self.emitted, end - self.hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
