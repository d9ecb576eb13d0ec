"""The OpenAI-compatible API with the official `openai` client against a real server on loopback:
the same engine as gRPC, so every greedy answer equals the gRPC answer for the same prompt and adapter."""

from __future__ import annotations

import json

import httpx
import pytest
from http_helpers import API_KEY, SERVED, base_url, client, http_server, scrape
from test_chat import MESSAGES

from loramux.v1 import loramux_pb2 as pb

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(chat_llama_dir, made, tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("http-api")
    with http_server(chat_llama_dir, root, {"a": made["a"].path, "b": made["b"].path}) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server):  # noqa: ANN001, ANN201
    with client(server) as c:
        yield c


def grpc_answer(server, adapter: str = "", n: int = 8, **source: object) -> pb.GenerateResponse:  # noqa: ANN001
    params = pb.SamplingParams(max_new_tokens=n, ignore_eos=True, **source.pop("params", {}))
    return server.gen.Generate(pb.GenerateRequest(adapter_id=adapter, params=params, return_logprobs=True, **source))


def test_models_lists_the_base_and_every_adapter(oai) -> None:
    models = {m.id: m for m in oai.models.list().data}
    assert set(models) == {SERVED, "a", "b"}
    assert models["a"].parent == SERVED and models["b"].parent == SERVED
    assert models[SERVED].parent is None and models[SERVED].owned_by == "loramux"


@pytest.mark.parametrize("model, adapter", [(SERVED, ""), ("a", "a"), ("b", "b")])
def test_completion_equals_grpc(server, oai, made, model: str, adapter: str) -> None:
    want = grpc_answer(server, adapter, prompt="The adapter says")
    got = oai.completions.create(model=model, prompt="The adapter says", max_tokens=8, **GREEDY)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == want.prompt_tokens and got.usage.completion_tokens == 8
    assert got.usage.total_tokens == want.prompt_tokens + 8
    assert got.usage.prompt_tokens_details.cached_tokens >= 0
    assert got.model == model and got.object == "text_completion"
    if adapter:  # and PEFT agrees with both
        ids = list(server.engine.base.tokenizer("The adapter says").input_ids)
        assert list(want.token_ids) == made[adapter].greedy(8, ids)


def test_token_id_prompts_and_several_prompts_in_one_call(server, oai) -> None:
    prompts = [[10, 20, 30, 40], [7, 8, 9], [100, 101]]
    got = oai.completions.create(model="a", prompt=prompts, max_tokens=5, **GREEDY)
    assert [c.index for c in got.choices] == [0, 1, 2]
    for c, ids in zip(got.choices, prompts):
        assert c.text == grpc_answer(server, "a", 5, prompt_token_ids=ids).text
    assert got.usage.prompt_tokens == sum(map(len, prompts)) and got.usage.completion_tokens == 15
    single = oai.completions.create(model="a", prompt=prompts[1], max_tokens=5, **GREEDY)
    assert single.choices[0].text == got.choices[1].text


def test_a_repeated_prompt_reports_its_cached_tokens(server, oai) -> None:
    """usage.prompt_tokens_details.cached_tokens is the engine's prefix-cache count, as gRPC's cached_tokens."""
    bs = server.engine.pool.block_size
    ids = [3 + (5 * i) % 250 for i in range(2 * bs + 3)]  # two full blocks, then the block with the last token
    first = oai.completions.create(model="b", prompt=ids, max_tokens=4, **GREEDY)
    again = oai.completions.create(model="b", prompt=ids, max_tokens=4, **GREEDY)
    assert again.usage.prompt_tokens_details.cached_tokens == 2 * bs
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].text == first.choices[0].text == grpc_answer(server, "b", 4, prompt_token_ids=ids).text


def test_stream_joins_up_to_the_unary_text_and_reports_usage(oai) -> None:
    kw = {"model": "b", "prompt": "stream me", "max_tokens": 12, **GREEDY}
    unary = oai.completions.create(**kw)
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == unary.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == unary.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(server) -> None:
    body = {"model": SERVED, "prompt": "wire", "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", base_url(server) + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert all("choices" in json.loads(e[6:]) for e in events[:-1])


def test_chat_equals_grpc_streamed_and_not(server, oai) -> None:
    msgs = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES]
    for model, adapter in ((SERVED, ""), ("a", "a")):
        want = grpc_answer(server, adapter, 10, messages=msgs)
        got = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, **GREEDY)
        assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
        assert got.usage.prompt_tokens == want.prompt_tokens and got.object == "chat.completion"
        chunks = list(oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, stream=True,
                                                  **GREEDY))  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_are_the_seeded_samples(server, oai) -> None:
    kw = {"model": "a", "prompt": "sample", "max_tokens": 6, "n": 3, "seed": 42, "temperature": 1.0,
          "extra_body": {"ignore_eos": True}}  # fmt: skip
    got = oai.completions.create(**kw)
    assert [c.index for c in got.choices] == [0, 1, 2]
    for j, c in enumerate(got.choices):  # choice j samples with seed + j, exactly as a gRPC request would
        assert c.text == grpc_answer(server, "a", 6, prompt="sample", params={"temperature": 1.0, "seed": 42 + j}).text
    assert len({c.text for c in got.choices}) > 1
    assert got.usage.completion_tokens == 18 and got.usage.prompt_tokens == len("sample")
    streamed = list(oai.completions.create(stream=True, **kw))
    for j in range(3):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == j) == got.choices[j].text


def test_logprobs_in_openais_shape(server, oai) -> None:
    want = grpc_answer(server, "b", prompt="logprobs")
    got = oai.completions.create(model="b", prompt="logprobs", max_tokens=8, logprobs=0, **GREEDY)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(list(want.logprobs))
    tok = server.engine.base.tokenizer
    assert lp.tokens == [tok.decode([t]) for t in want.token_ids]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    chat = oai.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=5, logprobs=True, **GREEDY)
    msgs = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES]
    want = grpc_answer(server, "", 5, messages=msgs)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(list(want.logprobs))
    assert all(c.top_logprobs == [] and c.bytes == list(c.token.encode()) for c in content)


def test_sampling_parameters_reach_the_engine(server, oai) -> None:
    """vLLM's extras and OpenAI's parameters map onto the contract's: same seed, same answer as gRPC."""
    params = {"temperature": 0.7, "top_p": 0.9, "seed": 5, "top_k": 20, "repetition_penalty": 1.3}
    want = grpc_answer(server, "", 8, prompt="params", params=params)
    extra = {"top_k": 20, "repetition_penalty": 1.3, "ignore_eos": True}
    got = oai.completions.create(model=SERVED, prompt="params", max_tokens=8, temperature=0.7, top_p=0.9, seed=5,
                                 extra_body=extra)  # fmt: skip
    assert got.choices[0].text == want.text
    stop = want.text[3:5]
    if stop and stop not in want.text[:3]:  # a stop string ends the text before it
        s = oai.completions.create(model=SERVED, prompt="params", max_tokens=8, temperature=0.7, top_p=0.9, seed=5,
                                   stop=[stop], extra_body=extra)  # fmt: skip
        assert s.choices[0].text == want.text[: want.text.index(stop)] and s.choices[0].finish_reason == "stop"


PENALTIES = {"presence_penalty": 1.5, "frequency_penalty": 2.0}


def test_seeded_penalties_and_min_p_give_the_grpc_tokens(server, oai) -> None:
    """presence/frequency penalties, min_p, top_k and repetition_penalty reach the sampler: a seeded call's
    tokens (and their log-probabilities) are the gRPC request's with the same values, and differ without them."""
    extra = {"min_p": 0.05, "top_k": 40, "repetition_penalty": 1.2}
    params = {"temperature": 0.9, "seed": 11, **PENALTIES, **extra}
    want = grpc_answer(server, "a", 12, prompt_token_ids=[5, 6, 7, 5, 6, 7], params=params)
    got = oai.completions.create(model="a", prompt=[5, 6, 7, 5, 6, 7], max_tokens=12, temperature=0.9, seed=11,
                                 logprobs=0, extra_body={**extra, "ignore_eos": True}, **PENALTIES)  # fmt: skip
    tok = server.engine.base.tokenizer
    assert got.choices[0].logprobs.tokens == [tok.decode([t]) for t in want.token_ids]
    assert got.choices[0].logprobs.token_logprobs == pytest.approx(list(want.logprobs))
    assert got.choices[0].text == want.text
    plain = grpc_answer(server, "a", 12, prompt_token_ids=[5, 6, 7, 5, 6, 7], params={"temperature": 0.9, "seed": 11})
    assert list(plain.token_ids) != list(want.token_ids)  # the penalties changed the draw


def test_penalties_apply_to_greedy_chat(server, oai) -> None:
    """Greedy requests get the penalties too (vLLM's order): chat with penalties equals gRPC with them."""
    msgs = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES]
    want = grpc_answer(server, "", 10, messages=msgs, params=PENALTIES)
    plain = grpc_answer(server, "", 10, messages=msgs)
    assert list(want.token_ids) != list(plain.token_ids)
    got = oai.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=10, **GREEDY, **PENALTIES)
    assert got.choices[0].message.content == want.text
    streamed = oai.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=10, stream=True, **GREEDY,
                                           **PENALTIES)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want.text


def test_http_requests_are_counted_and_logged_with_their_frontend(server, oai, caplog) -> None:
    before = scrape(server)
    caplog.set_level("INFO", logger="loramux.request")
    got = oai.completions.create(model=SERVED, prompt="count me", max_tokens=2, temperature=0)
    server.gen.Generate(pb.GenerateRequest(prompt="count me too", params=pb.SamplingParams(max_new_tokens=2)))
    after = scrape(server)

    def delta(**labels: str) -> float:
        return after.get("loramux_frontend_requests_total", **labels) - before.get(
            "loramux_frontend_requests_total", **labels
        )

    assert delta(frontend="http", status="ok") == 1 and delta(frontend="grpc", status="ok") == 1
    assert after.get("loramux_requests_total", status="ok") - before.get("loramux_requests_total", status="ok") == 2
    fields = [getattr(r, "loramux_fields", {}) for r in caplog.records]
    assert {f.get("frontend") for f in fields if f.get("status") == "ok"} == {"http", "grpc"}
    (line,) = [f for f in fields if f.get("frontend") == "http"]
    assert line["request_id"] == f"{got.id}-0" and got.id.startswith("cmpl-")  # the call's id, choice 0
