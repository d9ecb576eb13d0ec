"""The foundation: a real server on loopback, real forwards, checked against plain transformers."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
import torch
from harness import Hold, ServerThread, wait_until

from loramux.v1 import loramux_pb2 as pb


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with ServerThread(tiny_llama_dir, max_running=32, max_queue=64) as s:
        yield s


def reference_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt_ids) :].tolist()


def greedy_request(ids: list[int], n: int, **kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=ids, params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True), **kw)


def wait_idle(server: ServerThread, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.engine.num_running == 0 and server.engine.num_waiting == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"engine not idle: {server.engine.num_running} running, {server.engine.num_waiting} waiting")


def test_single_greedy_matches_transformers(server, reference_llama):
    ids = list(b"The quick brown fox")
    ids = [b + 3 for b in ids]
    resp = server.gen.Generate(greedy_request(ids, 20))
    assert list(resp.token_ids) == reference_greedy(reference_llama, ids, 20)
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH
    assert resp.prompt_tokens == len(ids) and resp.generated_tokens == 20


def test_prompt_text_is_tokenized_like_the_tokenizer(server, reference_llama):
    resp = server.gen.Generate(pb.GenerateRequest(prompt="héllo", params=pb.SamplingParams(max_new_tokens=5)))
    ids = [b + 3 for b in "héllo".encode()]
    assert resp.prompt_tokens == len(ids)
    assert list(resp.token_ids) == reference_greedy(reference_llama, ids, 5)[: len(resp.token_ids)]


def test_24_concurrent_requests_match_transformers(server, reference_llama):
    rng = random.Random(1)
    cases = []
    for _ in range(24):
        ids = [rng.randrange(3, 259) for _ in range(rng.randint(3, 40))]
        cases.append((ids, rng.randint(1, 30)))
    futures = [server.gen.Generate.future(greedy_request(ids, n)) for ids, n in cases]
    for (ids, n), fut in zip(cases, futures):
        assert list(fut.result(timeout=120).token_ids) == reference_greedy(reference_llama, ids, n)


def test_stream_concatenates_to_unary(server):
    req = pb.GenerateRequest(prompt="stream me", params=pb.SamplingParams(max_new_tokens=24, ignore_eos=True))
    unary = server.gen.Generate(req)
    parts = list(server.gen.GenerateStream(req))
    assert [t for p in parts for t in p.token_ids] == list(unary.token_ids)
    assert "".join(p.text for p in parts) == unary.text
    assert parts[-1].finish_reason == unary.finish_reason
    assert all(p.finish_reason == pb.FINISH_REASON_UNSPECIFIED for p in parts[:-1])
    assert parts[-1].generated_tokens == 24


def test_short_request_during_long_one_finishes_first(server):
    long_req = greedy_request([10, 11, 12], 400)
    order: list[str] = []
    long_stream = server.gen.GenerateStream(long_req)
    first = next(long_stream)  # the long one is running
    assert first.token_ids

    def drain_long() -> None:
        for _ in long_stream:
            pass
        order.append("long")

    with Hold(server.engine):  # the short one arrives while the long one has ~400 steps to go
        short = server.gen.Generate.future(greedy_request([20, 21], 4))
        wait_until(lambda: server.engine.num_waiting == 1, "the short request to be queued")
    t = threading.Thread(target=drain_long)
    t.start()
    short.result(timeout=120)
    order.append("short")
    t.join(120)
    assert order == ["short", "long"]


def test_cancel_mid_stream_frees_everything(server, reference_llama):
    stream = server.gen.GenerateStream(greedy_request([5, 6, 7], 400))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.cancel()
    wait_idle(server)
    assert server.engine.pool.num_used == 0
    resp = server.gen.Generate(greedy_request([8, 9, 10], 6))
    assert list(resp.token_ids) == reference_greedy(reference_llama, [8, 9, 10], 6)


def test_deadline_frees_everything(server):
    """A running request whose deadline passes frees its KV blocks. The engine is held after the
    request's first step, so it cannot finish first however fast the machine is."""
    hold = Hold(server.engine)
    stream = server.gen.GenerateStream(greedy_request([5, 6, 7], 400), timeout=5)
    wait_until(lambda: server.engine.num_waiting == 1, "the request to be queued")
    hold.release(steps=1)  # prefill and one token; then held again
    assert next(stream).token_ids
    with pytest.raises(grpc.RpcError) as e:
        list(stream)  # nothing more comes while the engine is held: the deadline passes
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.engine.num_running == 1 and server.engine.pool.num_used > 0  # it still holds its blocks
    hold.release()
    wait_idle(server)
    assert server.engine.pool.num_used == 0


INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "req, code",
    [
        (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(prompt="x", prompt_token_ids=[5]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(prompt="x", adapter_id="nope"), grpc.StatusCode.NOT_FOUND),
        (pb.GenerateRequest(prompt_token_ids=[5, 99999]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(prompt="x", params=pb.SamplingParams(max_new_tokens=600)), INVALID),
        (pb.GenerateRequest(prompt="x" * 600), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(prompt="x", params=pb.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(prompt="x", params=pb.SamplingParams(top_p=1.5)), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(prompt="x", params=pb.SamplingParams(stop=[""])), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["empty", "both", "unknown-adapter", "bad-token", "too-many-new", "prompt-too-long", "temp", "top-p", "stop"],
)
def test_bad_requests_get_their_status(server, req, code):
    for call in (server.gen.Generate, lambda r: list(server.gen.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as e:
            call(req)
        assert e.value.code() == code, e.value.details()
        assert e.value.details()


def test_seed_makes_sampling_reproducible(server):
    def sample(seed: int) -> list[int]:
        params = pb.SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=seed, ignore_eos=True)
        return list(server.gen.Generate(pb.GenerateRequest(prompt="seeded", params=params)).token_ids)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_string_ends_generation_and_is_not_returned(server):
    base = server.gen.Generate(pb.GenerateRequest(prompt="abc", params=pb.SamplingParams(max_new_tokens=30)))
    text = base.text
    # a stop string taken from the middle of the greedy text
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    cut = text.index(stop)
    params = pb.SamplingParams(max_new_tokens=30, stop=[stop])
    resp = server.gen.Generate(pb.GenerateRequest(prompt="abc", params=params))
    assert resp.finish_reason == pb.FINISH_REASON_STOP
    assert resp.text == text[:cut]
    streamed = list(server.gen.GenerateStream(pb.GenerateRequest(prompt="abc", params=params)))
    assert "".join(p.text for p in streamed) == text[:cut]


def test_logprobs_are_the_models(server, reference_llama):
    ids = [40, 41, 42, 43]
    resp = server.gen.Generate(greedy_request(ids, 5, return_logprobs=True))
    assert len(resp.logprobs) == 5
    with torch.inference_mode():
        seq = torch.tensor([ids + list(resp.token_ids)])
        logits = reference_llama(seq).logits[0].float()
    want = torch.log_softmax(logits, -1)[len(ids) - 1 : -1].gather(1, torch.tensor(resp.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(list(resp.logprobs)), want, atol=1e-4)


def test_eos_ends_generation_unless_ignored(tiny_llama_dir, reference_llama, tmp_path):
    import shutil

    from transformers import AutoConfig

    ids = [50, 60, 70]
    greedy = reference_greedy(reference_llama, ids, 8)
    model_dir = tmp_path / "eos-model"
    shutil.copytree(tiny_llama_dir, model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.eos_token_id = greedy[3]  # the 4th greedy token becomes EOS
    cfg.save_pretrained(model_dir)
    with ServerThread(model_dir) as s:
        resp = s.gen.Generate(pb.GenerateRequest(prompt_token_ids=ids, params=pb.SamplingParams(max_new_tokens=8)))
        assert resp.finish_reason == pb.FINISH_REASON_EOS
        assert list(resp.token_ids) == greedy[: greedy.index(greedy[3]) + 1]
        resp = s.gen.Generate(greedy_request(ids, 8))
        assert list(resp.token_ids) == greedy and resp.finish_reason == pb.FINISH_REASON_LENGTH


def test_full_queue_is_resource_exhausted(tiny_llama_dir):
    with ServerThread(tiny_llama_dir, max_running=1, max_queue=2) as s:
        futures = [s.gen.Generate.future(greedy_request([5, 6], 200)) for _ in range(8)]
        codes = []
        for f in futures:
            try:
                f.result(timeout=120)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert grpc.StatusCode.OK in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
