"""The runner and paged attention on their own: staggered and chunked batches over tiny KV blocks, Llama and GPT-2."""

from __future__ import annotations

import copy

import pytest
import torch

from loramux.adapters.model.wrapped import WrappedModel
from loramux.engine.kv_blocks import BlockPool
from loramux.engine.request import Request, SamplingParams
from loramux.engine.runner import Batch, Runner
from loramux.model import build_from_config, tiny_gpt2_config, tiny_llama_config

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26]]


def _want(reference, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def _run(runner: Runner, batch: Batch) -> torch.Tensor:
    """One forward, then what the engine does once the step's tokens are drawn: commit every request."""
    before = [r.num_computed for r in batch.requests]
    logits = runner.run(batch)
    assert [r.num_computed for r in batch.requests] == before  # run moves no request's state
    for r in batch.requests:
        runner.commit(r)
    return logits


def _schedule(pool: BlockPool, r: Request, n: int) -> None:
    """What the scheduler does for a request: blocks for its next n positions, scattered over the pool."""
    r.num_scheduled = n
    while pool.block_size * len(r.block_table) < r.num_computed + n:
        r.block_table.append(pool.allocate())


@pytest.mark.parametrize("config", [tiny_llama_config, tiny_gpt2_config], ids=["llama", "gpt2"])
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_staggered_batches_over_blocks_equal_transformers(config, block_size):
    """Prefills join while others decode; every sequence's K/V are spread over non-adjacent blocks."""
    cfg = config()
    reference = build_from_config(copy.deepcopy(cfg), seed=0)
    pool = BlockPool(64, block_size)
    for _ in range(5):  # blocks handed out in a scrambled order, so no table is contiguous
        pool.release([pool.allocate(), pool.allocate()][::-1])
    runner = Runner(WrappedModel(build_from_config(cfg, seed=0), num_slots=1), pool)
    reqs = [Request(f"r{i}", list(p), SamplingParams()) for i, p in enumerate(PROMPTS)]
    batches = [([reqs[0], reqs[1]], []), ([reqs[2]], reqs[:2])] + [([], reqs)] * 6
    for prefill, decode in batches:
        for r in prefill + decode:
            _schedule(pool, r, r.seq_len - r.num_computed)
        logits = _run(runner, Batch(prefill=list(prefill), decode=list(decode)))
        for r, row in zip(prefill + decode, logits):
            r.output_ids.append(int(row.argmax()))
    for r, prompt in zip(reqs, PROMPTS):
        assert r.output_ids == _want(reference, prompt, len(r.output_ids))


@pytest.mark.parametrize("config", [tiny_llama_config, tiny_gpt2_config], ids=["llama", "gpt2"])
def test_a_prompt_prefilled_in_chunks_beside_decodes_equals_transformers(config):
    """A 23-token prompt in chunks of 5 (crossing 4-token blocks) while another request decodes."""
    cfg = config()
    reference = build_from_config(copy.deepcopy(cfg), seed=0)
    pool = BlockPool(32, 4)
    runner = Runner(WrappedModel(build_from_config(cfg, seed=0), num_slots=1), pool)
    long = Request("long", list(range(30, 53)), SamplingParams())
    short = Request("short", [5, 6, 7], SamplingParams())
    _schedule(pool, short, 3)
    short.output_ids.append(int(_run(runner, Batch(prefill=[short], decode=[]))[0].argmax()))
    while long.num_computed < long.seq_len:
        _schedule(pool, long, min(5, long.seq_len - long.num_computed))
        _schedule(pool, short, 1)
        logits = _run(runner, Batch(prefill=[long], decode=[short]))
        short.output_ids.append(int(logits[1].argmax()))
    long.output_ids.append(int(logits[0].argmax()))
    for _ in range(4):
        _schedule(pool, long, 1)
        long.output_ids.append(int(_run(runner, Batch(prefill=[], decode=[long]))[0].argmax()))
    assert long.output_ids == _want(reference, long.prompt_ids, 5)
    assert short.output_ids == _want(reference, short.prompt_ids, len(short.output_ids))


def test_the_pool_is_sized_from_the_config_and_allocated_at_the_first_forward():
    from loramux.engine.kv_budget import kv_bytes_per_token

    llama = tiny_llama_config()  # 2 layers, 2 KV heads of 16
    assert kv_bytes_per_token(llama, torch.float32) == 2 * 2 * 2 * 16 * 4
    gpt2 = tiny_gpt2_config()  # 2 layers, 4 heads of 16 (no GQA)
    assert kv_bytes_per_token(gpt2, torch.bfloat16) == 2 * 2 * 4 * 16 * 2
    pool = BlockPool(10, 8)
    runner = Runner(WrappedModel(build_from_config(llama, seed=0), num_slots=1), pool)
    r = Request("r", [5, 6, 7], SamplingParams())
    _schedule(pool, r, 3)
    runner.run(Batch(prefill=[r], decode=[]))
    assert pool.nbytes() == 10 * 8 * kv_bytes_per_token(llama, torch.float32)


def test_a_kv_cache_that_cannot_fit_is_refused_at_start(tiny_llama_dir):
    from loramux.config import EngineConfig
    from loramux.engine.engine import Engine
    from loramux.model import load_base_model

    base = load_base_model(str(tiny_llama_dir), device="cpu")
    wrapped = WrappedModel(base.model, num_slots=1)
    with pytest.raises(ValueError, match="--kv-cache-mb .* does not fit"):
        Engine(base, wrapped, EngineConfig(kv_cache_mb=10**12, max_model_len=512))
    # Too small to hold one --max-model-len request: refused too, naming both flags.
    with pytest.raises(ValueError, match="raise --kv-cache-mb or lower --max-model-len"):
        Engine(base, wrapped, EngineConfig(kv_cache_mb=0.01, max_model_len=512))
    # The default budget is capped at what --max-running full-length requests need.
    engine = Engine(base, wrapped, EngineConfig(max_running=3, max_model_len=64, block_size=16))
    assert engine.pool.num_blocks == 3 * 4
