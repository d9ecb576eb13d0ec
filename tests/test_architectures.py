"""The architecture matrix: each architecture served through the real server, base and LoRA, exactly.

For every architecture of architectures.py: a tiny random model saved as a real model
directory, a PEFT LoRA on it in the store, and the real server on loopback. Greedy
tokens of the base model equal transformers', the LoRA's equal PEFT's, alone and in one
mixed batch (the engine held by a gate so both requests are admitted in one step).
An architecture the engine cannot serve exactly is refused at start, naming it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from architectures import ARCHS, Arch
from harness import Hold, ServerThread, wait_until
from peft import LoraConfig, get_peft_model
from peft_helpers import transformers_greedy
from transformers import AutoModelForCausalLM

from loramux.model import byte_tokenizer
from loramux.v1 import loramux_pb2 as pb

PROMPTS = [[5, 40, 77, 12, 200, 31, 9, 150, 66, 18, 3, 91], [7, 120, 45, 230, 16, 88, 5]]
STEPS = 12


def build(config, seed: int = 0):  # noqa: ANN001, ANN201
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()
    finally:
        torch.random.set_rng_state(state)


def greedy(model, ids: list[int], n: int = STEPS) -> list[int]:  # noqa: ANN001
    return transformers_greedy(model, ids, n)


def req(ids: list[int], adapter: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=adapter, prompt_token_ids=ids, params=pb.SamplingParams(max_new_tokens=STEPS, ignore_eos=True)
    )


@pytest.fixture(params=ARCHS, ids=[a.name for a in ARCHS])
def arch(request) -> Arch:
    return request.param


def make_model_and_lora(arch: Arch, tmp_path):  # noqa: ANN001, ANN201
    """The base model directory, a store holding the LoRA "lora", and the two oracles."""
    model_dir, store = tmp_path / "model", tmp_path / "store"
    base = build(arch.config())
    base.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    peft = get_peft_model(build(arch.config()), LoraConfig(r=4, lora_alpha=8, target_modules=arch.lora_targets))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    peft.save_pretrained(str(store / "lora"))
    return model_dir, store, base, peft.eval()


def test_served_exactly_or_refused(arch, tmp_path):
    model_dir, store, base, peft = make_model_and_lora(arch, tmp_path)
    if arch.refused is not None:
        with pytest.raises(Exception) as e:
            ServerThread(model_dir, store=store)
        for word in arch.refused:
            assert word in str(e.value)
        return
    want_base = [greedy(base, p) for p in PROMPTS]
    want_lora = [greedy(peft, p) for p in PROMPTS]
    assert want_base != want_lora, "the LoRA must change the output"
    for off in arch.without_feature:
        # Each special feature bites: switched off, transformers itself gives other tokens.
        plain = build(arch.config(**off))
        assert [greedy(plain, p) for p in PROMPTS] != want_base, f"{arch.name}: {off} changes nothing"
    with ServerThread(model_dir, store=store, max_device_adapters=2) as s:
        # Alone, one request at a time (the first one also loads the adapter into a slot).
        for p, wb, wl in zip(PROMPTS, want_base, want_lora):
            assert list(s.gen.Generate(req(p, "lora")).token_ids) == wl
            assert list(s.gen.Generate(req(p)).token_ids) == wb
        # One mixed batch: base and LoRA rows of both prompts admitted in the same step.
        cases = [(p, a) for p in PROMPTS for a in ("", "lora")]
        with Hold(s.engine):
            futures = [s.gen.Generate.future(req(p, a)) for p, a in cases]
            wait_until(lambda: s.engine.num_waiting == len(cases), f"{len(cases)} requests queued")
        got = [list(f.result(timeout=120).token_ids) for f in futures]
        assert got == [w for pair in zip(want_base, want_lora) for w in pair]


@pytest.mark.parametrize("name", ["mixtral", "gpt2"])
def test_decodes_compiled_exactly_in_every_row_range(name, tmp_path):
    """Compiled decode graphs where tracing once went wrong: Mixtral's expert routing makes a guard like
    2·B < 32767, which must hold over each row range's bounds (engine/compiled.py: the last range ends at
    --max-running), or compilation fails at start-up and every step runs eager; GPT-2's bottleneck points
    hook ln_1, through which dynamo first reaches the forward context, whose tensors' sizes it then took
    as static (steps of any other row count missed their graph). Base and LoRA rows, alone and in one
    batch of every row range, equal transformers and PEFT, every decode step compiled."""
    arch = next(a for a in ARCHS if a.name == name)
    model_dir, store, base, peft = make_model_and_lora(arch, tmp_path)
    with ServerThread(model_dir, store=store, max_device_adapters=2, compile=True, max_running=16) as s:
        c = s.engine.runner.compiled
        assert c.enabled and c.report.graphs == 6, c.report.error  # base and adapter graphs, three row ranges
        cases = [(p, a) for p in PROMPTS for a in ("", "lora")]
        for p, a in cases:  # one row
            assert list(s.gen.Generate(req(p, a)).token_ids) == greedy(peft if a else base, p)
        for n in (4, 10):  # 2 <= B <= 8, then B > 8
            batch = [cases[i % 4] for i in range(n)]
            with Hold(s.engine):
                futures = [s.gen.Generate.future(req(p, a)) for p, a in batch]
                wait_until(lambda n=n: s.engine.num_waiting == n, f"{n} requests queued")
            got = [list(f.result(timeout=120).token_ids) for f in futures]
            assert got == [greedy(peft if a else base, p) for p, a in batch]
        assert c.steps > 0 and c.misses == 0
