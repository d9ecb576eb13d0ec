"""The runner and flat attention on their own: dense and gathered decode attention, Llama and GPT-2."""

from __future__ import annotations

import copy

import pytest
import torch

from loramux.adapters.model.wrapped import WrappedModel
from loramux.engine.kv_cache import KVCache
from loramux.engine.request import Request, SamplingParams
from loramux.engine.runner import Batch, Runner
from loramux.model import build_from_config, tiny_gpt2_config, tiny_llama_config

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26]]


@pytest.mark.parametrize("config", [tiny_llama_config, tiny_gpt2_config], ids=["llama", "gpt2"])
@pytest.mark.parametrize("kv_rows", [[0, 1, 2], [0, 7, 15]], ids=["packed-rows", "sparse-rows"])
def test_staggered_batches_equal_transformers(config, kv_rows):
    """Prefills join while others decode; decode attention reads packed rows as views, sparse ones gathered."""
    cfg = config()
    reference = build_from_config(copy.deepcopy(cfg), seed=0)
    runner = Runner(WrappedModel(build_from_config(cfg, seed=0), num_slots=1), KVCache(16, 64))
    reqs = []
    for prompt, row in zip(PROMPTS, kv_rows):
        r = Request("r", list(prompt), SamplingParams())
        r.kv_slot = row
        reqs.append(r)
    batches = [Batch(prefill=reqs[:2], decode=[]), Batch(prefill=[reqs[2]], decode=reqs[:2])]
    batches += [Batch(prefill=[], decode=reqs) for _ in range(6)]
    for b in batches:
        logits = runner.run(b)
        for r, row in zip(b.requests, logits):
            runner.commit(r)
            r.output_ids.append(int(row.argmax()))
    for r, prompt in zip(reqs, PROMPTS):
        with torch.inference_mode():
            want = reference.generate(
                torch.tensor([prompt]), max_new_tokens=len(r.output_ids), do_sample=False, eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert r.output_ids == want


def test_kv_rows_are_handed_out_lowest_first():
    cache = KVCache(8, 4)
    rows = [cache.allocate() for _ in range(4)]
    assert rows == [0, 1, 2, 3]
    cache.release(1)
    cache.release(0)
    assert cache.allocate() == 0 and cache.allocate() == 1 and cache.allocate() == 4


def test_kv_cache_size_is_estimated_from_the_config():
    from loramux.engine.kv_cache import kv_cache_bytes

    llama = tiny_llama_config()  # 2 layers, 2 KV heads of 16
    assert kv_cache_bytes(llama, 8, 100, torch.float32) == 2 * 2 * 8 * 2 * 100 * 16 * 4
    gpt2 = tiny_gpt2_config()  # 2 layers, 4 heads of 16 (no GQA)
    assert kv_cache_bytes(gpt2, 8, 100, torch.bfloat16) == 2 * 2 * 8 * 4 * 100 * 16 * 2
    # The real allocation agrees with the estimate.
    cache = KVCache(8, 100)
    runner = Runner(WrappedModel(build_from_config(llama, seed=0), num_slots=1), cache)
    r = Request("r", [5, 6, 7], SamplingParams())
    r.kv_slot = cache.allocate()
    runner.run(Batch(prefill=[r], decode=[]))
    assert cache.nbytes() == kv_cache_bytes(llama, 8, 100, torch.float32)


def test_a_kv_cache_that_cannot_fit_is_refused_at_start(tiny_llama_dir):
    from loramux.config import EngineConfig
    from loramux.engine.engine import Engine
    from loramux.model import load_base_model

    base = load_base_model(str(tiny_llama_dir), device="cpu")
    wrapped = WrappedModel(base.model, num_slots=1)
    huge = EngineConfig(max_running=10**9, max_model_len=512)
    with pytest.raises(ValueError, match="--max-running"):
        Engine(base, wrapped, huge)
