"""Sampling through a real server: validation, seeds across batches, penalties against transformers, isolation.

"One batch" is made deterministic by holding the engine loop with `engine.call` until
every request is queued, so all are admitted in the same step and share every forward.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from harness import Hold, ServerThread, wait_until
from peft import LoraConfig
from peft_helpers import make_peft_adapter
from safetensors.torch import load_file, save_file

from loramux.model import tiny_llama_config
from loramux.v1 import loramux_pb2 as pb

PROMPT = [b + 3 for b in b"sampling"]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store with one LoRA whose weights are finite but overflow float32 activations (inf, then NaN)."""
    root = tmp_path_factory.mktemp("sampling-store")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(tiny_llama_config(), lora, root / "overflow", seed=5)
    path = root / "overflow" / "adapter_model.safetensors"
    save_file({k: v * 1e19 for k, v in load_file(path).items()}, path)
    return root


@pytest.fixture(scope="module")
def server(tiny_llama_dir, store):
    with ServerThread(tiny_llama_dir, store=store, max_running=48, max_queue=128) as s:
        yield s


def params(n: int = 10, **kw: object) -> pb.SamplingParams:
    return pb.SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


def gen(prompt: list[int], n: int = 10, adapter: str = "", **kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=prompt, adapter_id=adapter, params=params(n, **kw))


def one_batch(s: ServerThread, requests: list[pb.GenerateRequest]) -> list:
    """Send `requests` so that the engine admits them all in one step. Returns unary futures."""
    with Hold(s.engine):
        futures = [s.gen.Generate.future(r, timeout=120) for r in requests]
        wait_until(lambda: s.engine.num_waiting == len(requests), f"{len(requests)} requests queued")
    return futures


def transformers_greedy(model, prompt: list[int], n: int, **kw: object) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, **kw
        )
    return out[0, len(prompt) :].tolist()


def tokens(s: ServerThread, r: pb.GenerateRequest) -> list[int]:
    return list(s.gen.Generate(r, timeout=120).token_ids)


BAD = {
    "temperature": [NAN, INF, -0.5],
    "top_p": [NAN, -0.1, 1.5, INF],
    "repetition_penalty": [NAN, -1.0, INF],
    "min_p": [NAN, -0.1, 1.5],
    "presence_penalty": [NAN, 2.5, -3.0, INF],
    "frequency_penalty": [NAN, -2.5, INF],
}


@pytest.mark.parametrize("field", list(BAD))
def test_nan_inf_and_out_of_range_are_invalid_argument(server, field):
    for value in BAD[field]:
        for call in (server.gen.Generate, lambda r: list(server.gen.GenerateStream(r))):
            with pytest.raises(grpc.RpcError) as e:
                call(gen(PROMPT, **{field: value}))
            assert e.value.code() == INVALID, (field, value)
            assert field in e.value.details(), e.value.details()


def test_filters_that_keep_one_token_equal_greedy(server, reference_llama):
    want = transformers_greedy(reference_llama, PROMPT, 12)
    assert tokens(server, gen(PROMPT, 12, temperature=1.0)) != want  # sampling is not greedy here...
    for kw in ({"top_k": 1}, {"top_p": 1e-7}, {"min_p": 1.0}):  # ...but these filters leave one token
        assert tokens(server, gen(PROMPT, 12, temperature=1.0, seed=3, **kw)) == want, kw


def test_a_seeded_request_is_the_same_inside_a_batch_of_32(server):
    seeded = gen(PROMPT, 16, temperature=0.9, top_k=40, top_p=0.9, seed=1234)
    alone = tokens(server, seeded)
    others = []
    for i in range(31):
        kw: dict[str, object] = {"temperature": 0.5 + 0.05 * i}
        if i % 2:
            kw["seed"] = i
        if i % 3 == 0:
            kw["top_k"] = 5 + i
        if i % 4 == 0:
            kw["top_p"] = 0.8
        if i % 5 == 0:
            kw.update(min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2)
        others.append(gen([3 + i, 40 + i, 7][: 1 + i % 3] + PROMPT[: i % 5], 8 + i % 9, **kw))
    futures = one_batch(server, [*others[:13], seeded, *others[13:]])
    got = [list(f.result().token_ids) for f in futures]
    assert got[13] == alone
    assert len({tuple(t) for t in got}) > 20  # the others really sampled


def test_repetition_penalty_equals_transformers(server, reference_llama):
    for rp in (1.5, 0.8):
        want = transformers_greedy(reference_llama, PROMPT, 16, repetition_penalty=rp)
        assert tokens(server, gen(PROMPT, 16, repetition_penalty=rp)) == want, rp


def test_presence_and_frequency_penalties_by_hand(server, reference_llama):
    """Greedy with OpenAI's penalties, recomputed by hand over plain transformers logits."""
    presence, frequency = 0.6, 0.9
    seq, out = list(PROMPT), []
    for _ in range(16):
        with torch.no_grad():
            logits = reference_llama(torch.tensor([seq])).logits[0, -1].double()
        for v in set(out):
            logits[v] -= frequency * out.count(v) + presence
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    assert out != transformers_greedy(reference_llama, PROMPT, 16)  # the penalties change the output
    assert tokens(server, gen(PROMPT, 16, presence_penalty=presence, frequency_penalty=frequency)) == out


def test_tiny_temperature_is_greedy_and_hurts_no_one(server, reference_llama):
    """temperature=1e-40 once made the sampler raise and failed every stream of its batch."""
    prompts = [PROMPT, [10, 11, 12], [50, 60]]
    seeded = gen([70, 71], 10, temperature=0.8, seed=9)
    alone = tokens(server, seeded)
    futures = one_batch(server, [gen(prompts[0], temperature=1e-40), gen(prompts[1]), gen(prompts[2]), seeded])
    got = [list(f.result().token_ids) for f in futures]
    assert got[:3] == [transformers_greedy(reference_llama, p, 10) for p in prompts]
    assert got[3] == alone


def test_a_row_whose_logits_overflow_fails_only_its_request(server, reference_llama):
    """The overflow adapter's row turns NaN in the forward: that request gets INTERNAL, its batch goes on."""
    server.adapters.LoadAdapter(pb.LoadAdapterRequest(adapter_id="overflow"), timeout=60)  # resident: same step
    seeded = gen([70, 71], 10, temperature=0.8, seed=9)
    alone = tokens(server, seeded)
    prompts = [PROMPT, [10, 11, 12]]
    broken = [gen([5, 6, 7], adapter="overflow"), gen([5, 6, 8], adapter="overflow", temperature=1.0)]
    futures = one_batch(server, [gen(prompts[0]), broken[0], seeded, broken[1], gen(prompts[1])])
    for f in (futures[1], futures[3]):
        with pytest.raises(grpc.RpcError) as e:
            f.result()
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "non-finite" in e.value.details()
    assert [list(futures[i].result().token_ids) for i in (0, 4)] == [
        transformers_greedy(reference_llama, p, 10) for p in prompts
    ]
    assert list(futures[2].result().token_ids) == alone
    assert tokens(server, gen(PROMPT)) == transformers_greedy(reference_llama, PROMPT, 10)  # still serving


def test_logprobs_of_sampled_tokens_are_the_models(server, reference_llama):
    r = gen(PROMPT, 6, temperature=1.0, seed=4, repetition_penalty=1.3)
    r.return_logprobs = True
    out = server.gen.Generate(r)
    seq = list(PROMPT)
    for tok, lp in zip(out.token_ids, out.logprobs):
        with torch.inference_mode():
            want = torch.log_softmax(reference_llama(torch.tensor([seq])).logits[0, -1], -1)[tok]
        assert lp == pytest.approx(float(want), abs=1e-4)
        seq.append(tok)
