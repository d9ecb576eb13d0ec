"""How the HTTP API streams: chunks written from a per-call template, a step's events handed to the event loop
at once, and a stream that fell behind catching up in one chunk (never where logprobs are asked for)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from harness import Hold, wait_until
from http_helpers import SERVED, client, http_server

from loramux.api.bridge import EventBridge
from loramux.api.requests import events
from loramux.engine.request import FinishReason, TokenEvent
from loramux.http.convert import Shapes, to_json

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
TEXTS = ["", "plain", 'a "quote", a \\ and a\nnewline\t\x01', "ünïcödé ✓ 字", "\ud7ff"]


def _head(kind: str, shapes: Shapes) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": shapes.id, "object": obj, "created": shapes.created, "model": shapes.model}


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_a_chunk_is_the_json_of_its_dict(kind: str) -> None:
    """The templated chunk is byte for byte the compact JSON of OpenAI's chunk object, whatever its text."""
    shapes = Shapes(kind, 'cmpl-"x"', "mödel/a", tokenizer=None)
    lp = {"tokens": ["a", "é"], "token_logprobs": [-0.5, -1.25], "top_logprobs": None, "text_offset": [3, 4]}
    for text in TEXTS:
        for finish in (None, "length", "stop"):
            for logprobs in (None, lp):
                for usage in (False, True):
                    for first in (False, True) if kind == "chat" else (False,):
                        if kind == "chat":
                            delta = {"role": "assistant"} if first else {}
                            delta["content"] = text
                            choice = {"index": 2, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                        else:
                            choice = {"index": 2, "text": text, "logprobs": logprobs, "finish_reason": finish}
                        want = {**_head(kind, shapes), "choices": [choice]}
                        if usage:
                            want["usage"] = None
                        assert shapes.chunk(2, text, finish, logprobs, usage, first=first) == to_json(want)
    if kind == "chat":  # a delta without content
        want = {**_head(kind, shapes), "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": None}]}
        assert shapes.chunk(0, None, None, None, False) == to_json(want)


def _ev(i: int, final: bool = False) -> TokenEvent:
    return TokenEvent([i], f"t{i} ", [-float(i)], FinishReason.LENGTH if final else FinishReason.UNSPECIFIED)


def test_the_bridge_hands_every_event_over_in_order() -> None:
    """Events sunk from another thread (the engine's) reach each request's queue on the loop, all and in order,
    also when they arrive while the loop is busy and one drain takes many."""

    async def run() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        bridge = EventBridge(loop)
        queues = [asyncio.Queue() for _ in range(4)]
        sinks = [bridge.sink(q) for q in queues]
        busy, emitted = threading.Event(), threading.Event()

        def engine() -> None:
            busy.wait(60)
            for i in range(50):
                for sink in sinks:
                    sink(_ev(i))
                if i == 25:
                    emitted.set()  # the first half is sunk while the loop is blocked below

        thread = threading.Thread(target=engine)
        thread.start()
        busy.set()
        emitted.wait(60)  # the loop blocked: the events so far wait in the bridge
        got: list[list[int]] = [[] for _ in queues]
        for k, q in enumerate(queues):
            while len(got[k]) < 50:
                got[k].extend((await q.get()).token_ids)
        thread.join(60)
        return got

    assert asyncio.run(run()) == [list(range(50))] * 4


def test_the_bridge_of_a_closed_loop_raises_as_the_loop_does() -> None:
    loop = asyncio.new_event_loop()
    sink = EventBridge(loop).sink(asyncio.Queue())
    loop.close()
    for _ in range(2):  # and keeps raising: nothing is left pending
        with pytest.raises(RuntimeError):
            sink(_ev(0))


def _collect(queue: asyncio.Queue, coalesce: bool, *evs: TokenEvent) -> tuple[list[TokenEvent], BaseException | None]:
    async def run() -> tuple[list[TokenEvent], BaseException | None]:
        for ev in evs:
            queue.put_nowait(ev)
        out: list[TokenEvent] = []
        try:
            async for ev in events(None, None, queue, coalesce):  # the request ends in every case: no cancel
                out.append(ev)
        except Exception as e:
            return out, e
        return out, None

    return asyncio.run(run())


def test_events_join_what_is_waiting_only_when_asked_and_never_an_error() -> None:
    evs = [_ev(1), _ev(2), _ev(3, final=True)]
    apart, _ = _collect(asyncio.Queue(), False, *evs)
    assert [e.token_ids for e in apart] == [[1], [2], [3]]
    (joined,), _ = _collect(asyncio.Queue(), True, *evs)
    assert joined.token_ids == [1, 2, 3] and joined.text == "t1 t2 t3 " and joined.logprobs == [-1.0, -2.0, -3.0]
    assert joined.final and joined.finish_reason == FinishReason.LENGTH
    boom = RuntimeError("engine failed")
    out, err = _collect(asyncio.Queue(), True, _ev(1), _ev(2), TokenEvent([], "", [], error=boom))
    assert [e.token_ids for e in out] == [[1, 2]] and err is boom  # the tokens before it, then the error


@pytest.fixture(scope="module")
def server(chat_llama_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    with http_server(chat_llama_dir, tmp_path_factory.mktemp("http-stream"), {}) as s:
        yield s


def _stream_behind(server, **kw: object) -> list:  # noqa: ANN001
    """Stream a call whose every token is generated while the server's event loop is blocked."""
    chunks: list = []
    with client(server) as oai, Hold(server.engine) as hold:
        reader = threading.Thread(target=lambda: chunks.extend(oai.completions.create(stream=True, **kw)))
        reader.start()
        wait_until(lambda: server.engine.num_waiting == 1, "the call is queued in the engine")
        blocked, unblock = threading.Event(), threading.Event()
        server.loop.call_soon_threadsafe(lambda: (blocked.set(), unblock.wait(120)))
        blocked.wait(60)
        hold.release()
        wait_until(lambda: server.engine.idle, "the engine generated every token")
        unblock.set()
        reader.join(120)
    return [c for c in chunks if c.choices]


def test_a_stream_that_fell_behind_catches_up_in_one_chunk(server) -> None:  # noqa: ANN001
    kw = {"model": SERVED, "prompt": "behind", "max_tokens": 12, **GREEDY}
    with client(server) as oai:
        unary = oai.completions.create(**kw)
    chunks = _stream_behind(server, **kw)
    assert len(chunks) == 1  # the 12 tokens were all waiting: one write
    assert chunks[0].choices[0].text == unary.choices[0].text and chunks[0].choices[0].finish_reason == "length"


def test_with_logprobs_every_token_keeps_its_chunk(server) -> None:  # noqa: ANN001
    kw = {"model": SERVED, "prompt": "behind", "max_tokens": 12, "logprobs": 0, **GREEDY}
    with client(server) as oai:
        unary = oai.completions.create(**kw)
    chunks = _stream_behind(server, **kw)
    assert len(chunks) == 12
    assert [c.choices[0].logprobs.tokens for c in chunks] == [[t] for t in unary.choices[0].logprobs.tokens]
    lps = [c.choices[0].logprobs.token_logprobs[0] for c in chunks]
    assert lps == pytest.approx(unary.choices[0].logprobs.token_logprobs)
    assert "".join(c.choices[0].text for c in chunks) == unary.choices[0].text
