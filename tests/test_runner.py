"""The runner and flat attention on their own: dense and gathered decode attention, Llama and GPT-2."""

from __future__ import annotations

import copy

import pytest
import torch

from loramux.adapters.wrapped import WrappedModel
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
