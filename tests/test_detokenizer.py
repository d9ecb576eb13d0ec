"""Incremental detokenization against the tokenizer's own decode, with tokenizers trained here."""

from __future__ import annotations

import pytest
from trained_tokenizers import byte_level_bpe, metaspace_byte_fallback

from loramux.engine.detokenizer import Detokenizer, _OffsetStream

TEXTS = [
    "Café naïve façade, Zürich — Ångström.",
    "東京は日本の首都です。北京と上海",
    "ok 🎉🚀 done 👩‍💻 and 🇫🇷!",
    "mixed: résumé 東京 🎉 fox",
]


@pytest.fixture(scope="module", params=["byte-level-bpe", "metaspace-byte-fallback"])
def tokenizer(request):
    return byte_level_bpe() if request.param == "byte-level-bpe" else metaspace_byte_fallback()


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = (), slow: bool = False) -> tuple[list[str], int]:
    """Feed ids one by one as the engine does; returns the released chunks and how many ids were used."""
    d = Detokenizer(tokenizer, stop)
    if slow:
        d._stream = _OffsetStream(tokenizer)
    chunks: list[str] = []
    for n, t in enumerate(ids, 1):
        d.add(t)
        final = d.stopped or n == len(ids)
        chunks.append(d.release(final))
        if d.stopped:
            return chunks, n
    return chunks, len(ids)


def test_characters_really_span_several_tokens(tokenizer):
    """The tests below bite: some characters of every text are cut into bytes by these tokenizers."""
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        partial = [tokenizer.decode(ids[:i]) for i in range(1, len(ids))]
        assert any(p.endswith("\ufffd") for p in partial), text


@pytest.mark.parametrize("slow", [False, True], ids=["DecodeStream", "offsets"])
def test_stream_is_the_decode_and_never_half_a_character(tokenizer, slow):
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        chunks, _ = stream(tokenizer, ids, slow=slow)
        assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True) == text
        assert not any("\ufffd" in c for c in chunks)


@pytest.mark.parametrize("slow", [False, True], ids=["DecodeStream", "offsets"])
@pytest.mark.parametrize("stop", ["東京", "🎉", "é 東", "京 🎉 f", "👩‍💻"])
def test_multibyte_stop_strings_stop_at_once_and_never_leak(tokenizer, stop, slow):
    text = "mixed: résumé 東京 🎉 fox, ok 👩‍💻 end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    chunks, used = stream(tokenizer, ids, stop=(stop, "🚀"), slow=slow)
    out = "".join(chunks)
    assert stop not in out
    # It stops at the first token whose text completes the stop string, not a token later.
    assert stop in tokenizer.decode(ids[:used]) and stop not in tokenizer.decode(ids[: used - 1])
    # The text is the decode of the ids up to the stop, cut where the stop string starts.
    full = tokenizer.decode(ids[:used])
    assert out == full[: full.index(stop)]
    assert not any("\ufffd" in c for c in chunks)


def test_the_start_of_a_stop_string_is_held_until_it_is_decided(tokenizer):
    ids = tokenizer.encode("ab 東京 cd", add_special_tokens=False)
    chunks, used = stream(tokenizer, ids, stop=("東京タワー",))
    assert used == len(ids)  # never matched
    assert "".join(chunks) == "ab 東京 cd"
    # Before the end, nothing that could still start "東京タワー" was out.
    for i in range(1, len(chunks)):
        released = "".join(chunks[:i])
        assert not any(released.endswith("東京タワー"[:k]) for k in range(1, 5))


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("Café 東京", add_special_tokens=False)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    chunks, _ = stream(tokenizer, [*ids, eos])
    assert "".join(chunks) == "Café 東京"
