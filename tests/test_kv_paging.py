"""The paged KV cache served end to end: tiny blocks and a tight budget force paging, chunked
prefill and preemption; outputs still equal transformers / PEFT, prefix hits are exact and
never cross adapters or uploads, and cancelled or expired requests free every block."""

from __future__ import annotations

import random
import time
import urllib.request

import grpc
import pytest
import torch
from harness import Hold, ServerThread, wait_until
from peft import LoraConfig
from peft_helpers import make_peft_adapter
from prometheus_client.parser import text_string_to_metric_families
from registry_helpers import Adapter, upload

from loramux.engine.kv_budget import kv_bytes_per_token
from loramux.model import tiny_llama_config
from loramux.v1 import loramux_pb2 as pb

BLOCK = 4
MAX_LEN = 96
# 40 blocks of 4 tokens: under two --max-model-len requests, so a dozen requests must share by preemption
TIGHT = dict(block_size=BLOCK, max_model_len=MAX_LEN, max_batch_tokens=16, max_running=16, max_queue=64,
             kv_cache_mb=40 * BLOCK * kv_bytes_per_token(tiny_llama_config(), torch.float32) / 2**20)  # fmt: skip
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist()


def greedy(ids: list[int], n: int, adapter: str = "", **params: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=adapter, prompt_token_ids=ids, params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True, **params)
    )


class StepSpy:
    """Records every forward's (request id, positions computed, decode?) triples."""

    def __init__(self, runner) -> None:
        self.steps: list[list[tuple[str, int, bool]]] = []
        inner = runner.run

        def run(batch):
            decode = set(map(id, batch.decode))
            self.steps.append([(r.request_id, r.num_scheduled, id(r) in decode) for r in batch.requests])
            return inner(batch)

        runner.run = run


def metric(s: ServerThread, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.server.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples if smp.name == name)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("paging-store")
    return root, {n: Adapter(root / n, make_peft_adapter(tiny_llama_config(), LORA, root / n, seed=s))
                  for n, s in (("a", 21), ("b", 22))}  # fmt: skip


@pytest.fixture(scope="module")
def tight(tiny_llama_dir, adapters):
    with ServerThread(tiny_llama_dir, store=adapters[0], max_device_adapters=4, **TIGHT) as s:
        yield s


def test_paging_chunking_and_preemption_change_no_output(tight, reference_llama, adapters):
    """A dozen mixed-adapter requests on 40 blocks: preempted and chunked, every one equals its oracle."""
    _, made = adapters
    rng = random.Random(5)
    names = ["", "a", "b"]
    cases = [([rng.randrange(3, 259) for _ in range(rng.randint(5, 40))], rng.randint(20, 50), names[i % 3])
             for i in range(12)]  # fmt: skip
    spy = StepSpy(tight.engine.runner)
    before = tight.engine.scheduler.preemptions
    held = Hold(tight.engine)
    futures = [tight.gen.Generate.future(greedy(ids, n, a), timeout=300) for ids, n, a in cases]
    wait_until(lambda: tight.engine.num_waiting == len(cases), "all requests queued")
    held.release()
    results = [f.result() for f in futures]
    for (ids, n, a), resp in zip(cases, results):
        want = reference_greedy(made[a].model if a else reference_llama, ids, n)
        assert list(resp.token_ids) == want, (a, ids)
    assert tight.engine.scheduler.preemptions > before, "the budget never forced a preemption"
    chunked = [st for st in spy.steps if any(not dec and k < 40 and k > 1 for _, k, dec in st)]
    assert any(any(dec for _, _, dec in st) for st in chunked), "no prefill chunk ran beside decodes"
    for st in spy.steps:  # every decode runs; chunks get the rest of the 16 tokens, at least one block
        ones = sum(k == 1 for _, k, _ in st)
        assert sum(k for _, k, _ in st if k > 1) <= max(16 - ones, BLOCK), st
    wait_until(lambda: tight.engine.idle, "idle")
    assert tight.engine.pool.num_used == 0
    assert metric(tight, "loramux_preemptions_total") >= tight.engine.scheduler.preemptions - before > 0
    assert metric(tight, "loramux_kv_blocks_total") == tight.engine.pool.num_blocks == 40


def test_seeded_sampling_and_logprobs_survive_preemption(tight, tiny_llama_dir):
    """Sampled with seeds and penalties, chunked and preempted: the same tokens and logprobs as on a roomy server."""
    rng = random.Random(8)
    cases = [[rng.randrange(3, 259) for _ in range(rng.randint(10, 30))] for _ in range(8)]

    def req(ids: list[int], i: int) -> pb.GenerateRequest:
        r = greedy(ids, 40, temperature=0.9, top_p=0.95, top_k=50, seed=100 + i, repetition_penalty=1.1,
                   presence_penalty=0.5, frequency_penalty=0.3)  # fmt: skip
        r.return_logprobs = True
        return r

    before = tight.engine.scheduler.preemptions
    held = Hold(tight.engine)
    futures = [tight.gen.Generate.future(req(ids, i), timeout=300) for i, ids in enumerate(cases)]
    wait_until(lambda: tight.engine.num_waiting == len(cases), "all requests queued")
    held.release()
    got = [f.result() for f in futures]
    assert tight.engine.scheduler.preemptions > before
    wait_until(lambda: tight.engine.idle, "idle")
    assert tight.engine.sampler.penalties.rows_held == 0  # chunks and preemptions leave no penalty state behind
    with ServerThread(tiny_llama_dir, max_model_len=MAX_LEN) as roomy:
        want = [roomy.gen.Generate(req(ids, i), timeout=120) for i, ids in enumerate(cases)]
    for g, w in zip(got, want):
        assert list(g.token_ids) == list(w.token_ids)
        assert list(g.logprobs) == pytest.approx(list(w.logprobs), abs=1e-4)


def test_what_a_blocks_last_owner_left_never_reaches_its_next_owner(tight, reference_llama, adapters):
    """Every block's K/V overwritten with NaN by a 'last owner', then handed out again: outputs equal the oracle.

    Attention does not mask the gathered copy (paged_attention.py): the slots past a row's
    length and its table's padding are masked in the scores only, which is exact as long as
    they hold finite values; the pool zeroes a block handed out again before the next forward.
    """
    _, made = adapters
    pool = tight.engine.pool

    def poison() -> None:
        pool.clear_cache()
        blocks = [pool.allocate() for _ in range(pool.num_free)]  # every block, as one last owner
        with torch.inference_mode():
            for t in (*pool.keys.values(), *pool.values.values()):
                t[blocks] = float("nan")
        pool.release(blocks)

    wait_until(lambda: tight.engine.idle, "idle")
    tight.engine.call(poison).result(timeout=60)
    rng = random.Random(9)
    cases = [([rng.randrange(3, 259) for _ in range(rng.randint(3, 30))], rng.randint(5, 30), ("", "a", "b")[i % 3])
             for i in range(6)]  # fmt: skip
    held = Hold(tight.engine)
    futures = [tight.gen.Generate.future(greedy(ids, n, a), timeout=300) for ids, n, a in cases]
    wait_until(lambda: tight.engine.num_waiting == len(cases), "all requests queued")
    held.release()
    for (ids, n, a), f in zip(cases, futures):
        assert list(f.result().token_ids) == reference_greedy(made[a].model if a else reference_llama, ids, n)


def test_a_repeated_prefix_is_served_from_the_cache(tight, reference_llama):
    shared = list(range(40, 80))  # 40 tokens: 10 full blocks
    first = tight.gen.Generate(greedy(shared + [5, 6, 7], 8))
    assert first.cached_tokens == 0
    hits0 = metric(tight, "loramux_prefix_cache_hits_total")
    queries0 = metric(tight, "loramux_prefix_cache_queries_total")
    again = tight.gen.Generate(greedy(shared + [9, 10], 8))
    assert again.cached_tokens == 40
    assert list(again.token_ids) == reference_greedy(reference_llama, shared + [9, 10], 8)
    assert metric(tight, "loramux_prefix_cache_hits_total") - hits0 == 40
    assert metric(tight, "loramux_prefix_cache_queries_total") - queries0 == 42
    # The whole prompt again: every full block but the one holding its last token is a hit.
    stream = list(tight.gen.GenerateStream(greedy(shared + [5, 6, 7], 8)))
    assert stream[0].cached_tokens == 40 and all(m.cached_tokens == 0 for m in stream[1:])
    assert [t for m in stream for t in m.token_ids] == list(first.token_ids)
    wait_until(lambda: tight.engine.idle, "idle")
    assert tight.engine.pool.num_cached > 0 and metric(tight, "loramux_kv_blocks_cached") > 0


def test_blocks_are_never_shared_across_adapters_or_uploads_of_one_id(tiny_llama_dir, reference_llama, adapters,
                                                                      tmp_path):  # fmt: skip
    import shutil

    root, made = adapters
    store = tmp_path / "store"
    shutil.copytree(root / "a", store / "x")
    prompt = list(range(100, 140))
    with ServerThread(tiny_llama_dir, store=store, **TIGHT) as s:
        oracles = {"": reference_llama, "x": made["a"].model}
        for adapter in ("", "x"):
            assert s.gen.Generate(greedy(prompt, 6, adapter)).cached_tokens == 0, adapter
        for adapter in ("", "x"):
            resp = s.gen.Generate(greedy(prompt, 6, adapter))
            assert resp.cached_tokens == 36, adapter  # its own chain only
            assert list(resp.token_ids) == reference_greedy(oracles[adapter], prompt, 6), adapter
        b = made["b"]
        upload(s.adapters, "x", b.config, b.weights, overwrite=True, metadata=None)
        resp = s.gen.Generate(greedy(prompt, 6, "x"))
        assert resp.cached_tokens == 0, "KV of the old weights was served after an overwrite"
        assert list(resp.token_ids) == reference_greedy(b.model, prompt, 6)
        assert s.gen.Generate(greedy(prompt, 6, "x")).cached_tokens == 36


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_cancel_and_deadline_free_every_block(tight, how):
    wait_until(lambda: tight.engine.idle, "idle")
    tight.engine.pool.clear_cache()
    call = tight.gen.GenerateStream(greedy(list(range(3, 13)), 80), timeout=None if how == "cancel" else 5)
    stream = iter(call)
    next(stream)  # running: it holds blocks now
    held = Hold(tight.engine)
    assert tight.engine.pool.num_used > 0
    if how == "cancel":
        call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        for _ in stream:
            pass
    assert e.value.code() == (grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED)
    if how == "deadline":
        wait_until(lambda: tight.engine.scheduler.running[0].expired(time.monotonic()), "the deadline")
    held.release()
    wait_until(lambda: tight.engine.idle, "idle")
    pool = tight.engine.pool
    assert pool.num_used == 0 and pool.num_free == pool.num_blocks
