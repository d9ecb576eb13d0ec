"""The step budget's cost model (engine/step_cost.py) and the scheduler that fills `--max-batch-tokens` with it:
chunks shrink as their prompt's context grows, every step stays within the budget (or one block), prompts
always progress, and the tokens still equal transformers'."""

from __future__ import annotations

import math

import pytest
import torch

from loramux.adapters.model.wrapped import WrappedModel
from loramux.config import EngineConfig
from loramux.engine.engine import Engine
from loramux.engine.request import Request, SamplingParams
from loramux.engine.step_cost import DEVICE_FACTORS, StepCost, shape_of
from loramux.model import load_base_model, tiny_llama_config


@pytest.mark.parametrize("cost", [StepCost(), StepCost(300.0), StepCost(2832.0, 79.0), StepCost(7.5, 2.0)])
def test_tokens_within_is_the_largest_chunk_that_fits(cost):
    for context in (0, 1, 15, 300, 2000):
        for budget in (0.0, 0.5, 1.0, 7.0, 48.0, 63.9, 500.0):
            n = cost.tokens_within(context, budget)
            assert n == 0 or cost.chunk(context, n) <= budget
            assert cost.chunk(context, n + 1) > budget
    assert cost.tokens_within(100, 48.0) <= StepCost().tokens_within(100, 48.0) == 48


def test_chunk_cost_counts_projections_keys_and_the_gathered_context():
    cost = StepCost(100.0, 10.0)
    # 4 tokens after 6 positions see 7, 8, 9, 10 keys (34 in all) and gather the 6: 4 + 34/100 + 6/10
    assert cost.chunk(6, 4) == pytest.approx(4 + 0.34 + 0.6)
    assert StepCost().chunk(6, 4) == 4
    with pytest.raises(ValueError):
        StepCost(0.0)


def test_the_model_shape_gives_k_and_g(tiny_llama_dir):
    base = load_base_model(str(tiny_llama_dir), device="cpu", dtype="float32")
    cfg = tiny_llama_config()
    h, inter, heads, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = h // heads
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * inter  # q, o; k, v; gate, up, down
    assert shape_of(base.model) == (per_layer, heads, kv, d)
    alpha, gamma = DEVICE_FACTORS["cpu"]
    cpu = StepCost.of_model(base.model, "cpu")
    assert cpu.keys_per_token == pytest.approx(per_layer / (2 * heads * d) / alpha)
    assert cpu.positions_per_token == pytest.approx(per_layer / (2 * kv * d) / gamma)
    unmeasured = StepCost.of_model(base.model, "cuda")
    assert unmeasured.keys_per_token == pytest.approx(per_layer / (2 * heads * d))
    assert math.isinf(unmeasured.positions_per_token)


def _want(reference, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def test_chunks_shrink_with_context_within_the_budget_and_outputs_stay_exact(tiny_llama_dir, reference_llama):
    """Streams decode while a long prompt is prefilled: each chunk's cost fits what the decodes leave (or is
    the one-block minimum), deeper chunks get fewer tokens, every step carries one, and all tokens are exact."""
    base = load_base_model(str(tiny_llama_dir), device="cpu", dtype="float32")
    budget, block = 24, 4
    cfg = EngineConfig(max_batch_tokens=budget, block_size=block, max_model_len=256, prefix_caching=False)
    engine = Engine(base, WrappedModel(base.model, num_slots=1), cfg)
    cost = engine.scheduler.cost
    assert cost.keys_per_token < 1000 and cost.positions_per_token < 1000  # a tiny model: context is dear
    streams = [
        Request(f"s{i}", [3 + i, 40 + i, 7], SamplingParams(max_new_tokens=60, ignore_eos=True)) for i in range(4)
    ]
    long = Request("long", [3 + (7 * i) % 250 for i in range(150)], SamplingParams(max_new_tokens=3, ignore_eos=True))
    chunks: list[tuple[int, int, int]] = []  # (context, tokens, decodes beside it)
    inner = engine.runner.run

    def run(batch):
        decodes = sum(r.seq_len - r.num_computed == 1 for r in batch.requests)
        chunks.extend(
            (r.num_computed, r.num_scheduled, decodes) for r in batch.requests if r is long and not r.output_ids
        )
        return inner(batch)

    engine.runner.run = run

    def enqueue(r: Request) -> None:  # what the engine loop does with a submitted request (not started here)
        engine.validate(r)
        engine.submit(r)
        engine.scheduler.waiting.extend(engine._inbox)
        engine._inbox.clear()

    for r in streams:
        enqueue(r)
    while not all(r.output_ids for r in streams):
        engine.step()
    enqueue(long)
    while not long.output_ids:
        engine.step()
    while not engine.scheduler.idle:
        engine.step()
    assert len(chunks) > 3 and sum(n for _, n, _ in chunks) == long.prompt_len
    for (c, n, _), (c2, n2, _) in zip(chunks, chunks[1:]):
        assert c2 == c + n  # one chunk every step: the prompt progresses each step
        assert n2 <= n or c2 + n2 == long.prompt_len  # deeper, fewer (the last chunk is what is left)
    for c, n, decodes in chunks:
        assert n == min(block, long.prompt_len - c) or cost.chunk(c, n) <= budget - decodes
        assert n >= min(block, long.prompt_len - c)
    assert chunks[0][1] > 2 * chunks[-2][1]  # context made the later chunks much smaller
    for r in [*streams, long]:
        assert r.output_ids == _want(reference_llama, r.prompt_ids, r.params.max_new_tokens), r.request_id


def test_a_prefix_hit_that_the_rest_of_the_budget_cannot_pay_for_waits_a_step(tiny_llama_dir, reference_llama):
    """A short prompt takes the step's first chunk; a request whose cached context costs more than what is
    left is not scheduled with no tokens: it starts at the next step (where the one-block minimum holds), and every
    token is exact."""
    base = load_base_model(str(tiny_llama_dir), device="cpu", dtype="float32")
    cfg = EngineConfig(max_batch_tokens=12, block_size=4, max_model_len=256)
    engine = Engine(base, WrappedModel(base.model, num_slots=1), cfg)
    cost = engine.scheduler.cost
    shared = [3 + (5 * i) % 250 for i in range(64)]
    first = Request("first", shared + [9], SamplingParams(max_new_tokens=2, ignore_eos=True))
    short = Request("short", [7, 8, 9], SamplingParams(max_new_tokens=4, ignore_eos=True))
    hit = Request("hit", shared + [11, 12], SamplingParams(max_new_tokens=3, ignore_eos=True))
    # what the short prompt leaves is at least a token, but less than the gather of 64 cached positions
    assert 1 <= 12 - cost.chunk(0, 3) and cost.tokens_within(64, 12 - cost.chunk(0, 3)) == 0
    scheduled: list[list[tuple[str, int]]] = []
    inner = engine.runner.run

    def run(batch):
        scheduled.append([(r.request_id, r.num_scheduled) for r in batch.requests])
        return inner(batch)

    engine.runner.run = run

    def enqueue(r: Request) -> None:
        engine.validate(r)
        engine.submit(r)
        engine.scheduler.waiting.extend(engine._inbox)
        engine._inbox.clear()

    enqueue(first)
    while not engine.scheduler.idle:  # its 64 positions are now 16 cached blocks
        engine.step()
    scheduled.clear()
    enqueue(short)
    enqueue(hit)
    while not engine.scheduler.idle:
        engine.step()
    assert scheduled[0] == [("short", 3)]  # the hit waited: nothing was scheduled with no tokens
    assert ("hit", 2) in scheduled[1]  # then its last 2 positions (within the one-block minimum)
    assert hit.cached_tokens == 64
    for r in (first, short, hit):
        assert r.output_ids == _want(reference_llama, r.prompt_ids, r.params.max_new_tokens), r.request_id
