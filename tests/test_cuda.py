"""The CUDA path against the CPU path: same server code, same requests. Skips without a GPU."""

from __future__ import annotations

import pytest
import torch
from harness import ServerThread
from peft import LoraConfig
from peft_helpers import make_peft_adapter

from loramux.model import tiny_llama_config
from loramux.v1 import loramux_pb2 as pb

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run(server: ServerThread, cases: list[tuple[list[int], str]]) -> list[list[int]]:
    futures = [
        server.gen.Generate.future(
            pb.GenerateRequest(
                adapter_id=a, prompt_token_ids=ids, params=pb.SamplingParams(max_new_tokens=12, ignore_eos=True)
            )
        )
        for ids, a in cases
    ]
    return [list(f.result(timeout=300).token_ids) for f in futures]


def test_cuda_float32_equals_cpu_in_mixed_batches(tiny_llama_dir, tmp_path):
    """float32 on both devices: a mixed batch of base rows and three LoRA adapters gives the same tokens."""
    store = tmp_path / "store"
    for i, name in enumerate(("a", "b", "c")):
        cfg = LoraConfig(r=4 + 4 * i, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
        make_peft_adapter(tiny_llama_config(), cfg, store / name, seed=40 + i)
    cases = [([5 + i, 6 + i, 7 + i, 8], ["", "a", "b", "c"][i % 4]) for i in range(16)]
    with ServerThread(tiny_llama_dir, store=store, max_device_adapters=2) as cpu:
        want = _run(cpu, cases)
    with ServerThread(tiny_llama_dir, store=store, max_device_adapters=2, device="cuda", dtype="float32") as gpu:
        got = _run(gpu, cases)
    assert got == want


def test_cuda_bfloat16_serves(tiny_llama_dir):
    """The CUDA default dtype (bfloat16) runs end to end; a stream joins up to the unary reply."""
    req = pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=8, ignore_eos=True))
    with ServerThread(tiny_llama_dir, device="cuda") as gpu:
        assert gpu.server.base.dtype == torch.bfloat16
        unary = gpu.gen.Generate(req)
        parts = list(gpu.gen.GenerateStream(req))
    assert len(unary.token_ids) == 8 and unary.finish_reason == pb.FINISH_REASON_LENGTH
    assert [t for p in parts for t in p.token_ids] == list(unary.token_ids)
