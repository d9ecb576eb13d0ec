"""The compiled decode step (engine/compiled.py): compiled at start-up, exact, and never compiling while serving.

One server compiles (the tiny Llama: about half a minute on two cores), one runs eager;
both get the same requests. Oracles: transformers for base rows, PEFT for LoRA rows, and
the eager server for seeded sampling.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from harness import Hold, ServerThread, wait_until
from ops_helpers import scrape
from peft import IA3Config, LoraConfig
from peft_helpers import make_peft_adapter, transformers_greedy
from safetensors.torch import load_file
from test_soft_prompts import make_soft_prompt
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from loramux.engine.compiled import SMALL_ROWS, CompiledDecode, row_ranges
from loramux.model import byte_tokenizer, tiny_llama_config
from loramux.v1 import loramux_pb2 as pb

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
KINDS = {  # name: (config, seed); "a" and "b" share a layout, the others each bring their own kind
    "a": (LORA, 41),
    "b": (LORA, 42),
    "r16": (LoraConfig(r=16, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj"]), 43),
    "dora": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True), 44),
    "ia3": (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), 45),
}
FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
PROMPTS = [[5, 9, 200, 31], [77] * 20, list(range(3, 40)), [250, 4, 4, 9, 18, 3, 3]]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled-store")
    made = {n: make_peft_adapter(tiny_llama_config(), cfg, root / n, seed=seed) for n, (cfg, seed) in KINDS.items()}
    for i, name in enumerate(("prompt", "prefix")):  # soft prompts: compared with the eager server
        make_soft_prompt(name, root / name, seed=50 + i)
    return root, made


# both servers: every prompt of the mixed batch fits one prefill step, every adapter a device slot
SERVED = dict(max_running=16, block_size=4, max_device_adapters=8, max_batch_tokens=512)


@pytest.fixture(scope="module")
def compiled(tiny_llama_dir, store):
    with ServerThread(tiny_llama_dir, store=store[0], compile=True, merged_cache_mb=8, **SERVED) as s:
        yield s


@pytest.fixture(scope="module")
def eager(tiny_llama_dir, store):
    with ServerThread(tiny_llama_dir, store=store[0], compile=False, **SERVED) as s:
        yield s


greedy = transformers_greedy


def request(ids: list[int], n: int, adapter: str = "", **params: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=adapter, prompt_token_ids=ids, params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True, **params)
    )


def in_one_batch(s: ServerThread, reqs: list[pb.GenerateRequest]) -> list[pb.GenerateResponse]:
    with Hold(s.engine):
        futures = [s.gen.Generate.future(r, timeout=300) for r in reqs]
        wait_until(lambda: s.engine.num_waiting == len(reqs), f"{len(reqs)} requests queued")
    return [f.result() for f in futures]


def test_the_graphs_compile_at_start_up_and_pass_their_check(compiled, eager):
    c = compiled.engine.runner.compiled
    assert c is not None and c.enabled and c.serving and not c.warming
    # base, adapters and all-merged, each for B = 1, 2 <= B <= SMALL_ROWS and B > SMALL_ROWS
    assert c.report.graphs == 9 and c.report.error == "" and c.report.seconds > 0
    assert eager.engine.runner.compiled is None  # --no-compile: nothing is wrapped
    assert compiled.engine.pool.num_used == 0  # the warm-up gave back every block it took


def test_base_decodes_run_compiled_and_equal_transformers(compiled, reference_llama):
    c = compiled.engine.runner.compiled
    before = c.steps
    one = compiled.gen.Generate(request(PROMPTS[0], 12), timeout=300)  # B = 1
    assert list(one.token_ids) == greedy(reference_llama, PROMPTS[0], 12)
    got = in_one_batch(compiled, [request(p, 10 + 3 * i) for i, p in enumerate(PROMPTS)])  # B = 4 .. 1
    for i, (p, g) in enumerate(zip(PROMPTS, got)):
        assert list(g.token_ids) == greedy(reference_llama, p, 10 + 3 * i)
    many = [PROMPTS[i % 4][: 3 + i] for i in range(SMALL_ROWS + 3)]  # B = 11 .. 1: every row range's graph
    got = in_one_batch(compiled, [request(p, 6 + i) for i, p in enumerate(many)])
    for i, (p, g) in enumerate(zip(many, got)):
        assert list(g.token_ids) == greedy(reference_llama, p, 6 + i)
    assert c.steps - before >= 11 + 18 + 15  # every decode step of these base rows ran compiled
    assert c.misses == 0  # no step needed a graph that was not compiled at start-up


def test_mixed_adapter_batches_run_compiled_and_give_the_same_tokens_as_eager(compiled, eager, store, reference_llama):
    """Rows of LoRA (two ranks, two layouts), DoRA, IA3, soft prompts and the base model in one batch: every decode
    step runs on the adapter graph compiled before any adapter was loaded; each row equals PEFT or
    transformers, and seeded sampled rows equal the eager server's, token for token."""
    made = store[1]
    greedy_rows = [("a", 0, 14), ("b", 1, 6), ("r16", 3, 11), ("dora", 2, 9), ("ia3", 0, 12), ("", 2, 20)]
    reqs = [request(PROMPTS[p], n, name) for name, p, n in greedy_rows] + [
        request(PROMPTS[3], 16, temperature=0.9, top_p=0.9, top_k=20, seed=7, repetition_penalty=1.2),
        request(PROMPTS[1], 9, "a", temperature=1.0, seed=3, presence_penalty=0.5),
        request(PROMPTS[0], 12, "prompt"),
        request(PROMPTS[3], 10, "prefix"),
    ]
    for s in (compiled, eager):  # resident first, so that every prompt fits the batch's one prefill step
        for name in [*KINDS, "prompt", "prefix"]:
            s.adapters.LoadAdapter(pb.LoadAdapterRequest(adapter_id=name), timeout=120)
    c = compiled.engine.runner.compiled
    before = c.steps
    got = in_one_batch(compiled, reqs)
    want = in_one_batch(eager, reqs)
    assert [list(g.token_ids) for g in got] == [list(w.token_ids) for w in want]
    for (name, p, n), g in zip(greedy_rows, got):
        assert list(g.token_ids) == greedy(made[name] if name else reference_llama, PROMPTS[p], n), name
    # one prefill step (all prompts fit its budget), then 19 decode steps, each compiled (a merge the
    # policy might start would split a step into two compiled forwards: hence >=)
    assert c.steps - before >= 19 and c.misses == 0, (c.steps - before, c.misses)


def test_bottleneck_adapters_decode_compiled_and_a_step_no_graph_fits_runs_eager(tmp_path):
    """A bottleneck adapter loaded after start-up: its insertion points are opaque calls in the adapter
    graph, so its steps (and base steps while it is resident) run compiled and equal the AdapterHub
    fixture. Then a change the graphs never saw (a module put in training mode): guards fail, the steps
    run eager (counted), outputs stay exact, and /metrics says so."""
    root = tmp_path
    model_dir = root / "base"
    shutil.copytree(FIXTURES / "llama" / "base", model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    shutil.copytree(FIXTURES / "llama" / "seq_bn", root / "store" / "bn")
    prompts = json.loads((FIXTURES / "prompts.json").read_text())["token_ids"]
    want = load_file(FIXTURES / "llama" / "seq_bn" / "expected.safetensors")["greedy"]
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with ServerThread(model_dir, store=root / "store", compile=True, max_device_adapters=2) as s:
        c = s.engine.runner.compiled
        assert c.enabled and c.report.graphs == 6  # no merged cache: base and adapter graphs only
        assert list(s.gen.Generate(request(prompts[0], 6), timeout=300).token_ids) == greedy(base, prompts[0], 6)
        assert c.steps >= 5 and c.misses == 0
        s.adapters.LoadAdapter(pb.LoadAdapterRequest(adapter_id="bn"), timeout=60)
        steps = c.steps
        got = s.gen.Generate(request(prompts[0], want.shape[1], "bn"), timeout=300)
        assert list(got.token_ids) == want[0].tolist()
        assert list(s.gen.Generate(request(prompts[1], 6), timeout=300).token_ids) == greedy(base, prompts[1], 6)
        assert c.steps - steps >= want.shape[1] - 1 + 5 and c.misses == 0  # all compiled, bottleneck resident

        # attention reads `training` (its dropout; 0.0 in this config, so outputs do not change)
        attn = s.engine.runner.model.model.layers[0].self_attn
        attn.train()
        try:
            steps = c.steps
            assert list(s.gen.Generate(request(prompts[1], 6), timeout=300).token_ids) == greedy(base, prompts[1], 6)
            assert c.misses >= 5 and c.steps == steps  # eager, and nothing compiled while serving
        finally:
            attn.eval()
        m = scrape(s.server.metrics_port)  # the same counts, as an operator sees them
        assert m.get("loramux_compiled_forwards_total", result="eager") == c.misses
        assert m.get("loramux_compiled_forwards_total", result="compiled") == c.steps


def test_a_merged_adapter_decodes_compiled_and_equals_peft(compiled, store, reference_llama):
    """A merge made while serving runs on the graphs compiled at start-up (W0 stood for its weights)."""
    made = store[1]
    c = compiled.engine.runner.compiled
    m = compiled.adapters.LoadAdapter(pb.LoadAdapterRequest(adapter_id="b", merge=True), timeout=120)
    assert m.state == pb.ADAPTER_STATE_MERGED
    before, misses = c.steps, c.misses
    one = compiled.gen.Generate(request(PROMPTS[2], 12, "b"), timeout=300)
    assert list(one.token_ids) == greedy(made["b"], PROMPTS[2], 12)
    got = in_one_batch(compiled, [request(p, 8, "b") for p in PROMPTS])
    for p, g in zip(PROMPTS, got):
        assert list(g.token_ids) == greedy(made["b"], p, 8)
    assert c.steps - before >= 11 + 7 and c.misses == misses  # every merged decode step ran compiled
    # the merged adapter beside unmerged ones and the base model: the adapter graph (its layers undo
    # the merged delta for the other rows, or the step splits in two forwards), equal to PEFT
    before = c.steps
    rows = [("b", 0, 10), ("a", 1, 8), ("", 2, 6), ("b", 3, 9)]
    got = in_one_batch(compiled, [request(PROMPTS[p], n, name) for name, p, n in rows])
    for (name, p, n), g in zip(rows, got):
        assert list(g.token_ids) == greedy(made[name] if name else reference_llama, PROMPTS[p], n), name
    assert c.steps - before >= 9 and c.misses == misses


def _two_projections() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 64, bias=False))


def test_products_of_few_rows_read_each_weight_once_and_more_rows_keep_mm():
    """On CPU the products of graphs of at most SMALL_ROWS rows, one row or a range of rows, are rewritten
    (engine/products.py) and equal eager; a graph of more rows keeps `mm`."""
    model = _two_projections()
    c = CompiledDecode(model)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        c.warming = True
        for b, rewritten in ((1, 2), (3, 4), (SMALL_ROWS + 1, 4)):  # both projections of each small graph
            x = torch.randn(b, 64)
            assert torch.allclose(c([(x, 0)], [], input=x), model(x), atol=1e-5, rtol=1e-5)
            assert counters["inductor"]["loramux_products"] == rewritten, b
        c.warming, c.serving = False, True
        for b in (2, 5, SMALL_ROWS, SMALL_ROWS + 1, 40):  # the graphs serve their whole ranges, nothing compiles
            x = torch.randn(b, 64)
            assert torch.allclose(c([(x, 0)], [], input=x), model(x), atol=1e-5, rtol=1e-5)
        assert c.misses == 0 and c.steps == 5 and counters["inductor"]["loramux_products"] == 4


def test_without_the_few_row_graph_one_graph_serves_every_row_count_from_two():
    """The ranges used on CUDA (products left as they are): B = 1 and one graph of every B >= 2."""
    model = _two_projections()
    c = CompiledDecode(model)
    c.ranges = row_ranges(small_rows=False)
    torch._dynamo.reset()
    # not inductor's on-disk cache: the same graph compiled for 2 <= B <= 8 (the test above) is in it, and
    # its entry would bring its bounds
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        c.warming = True
        for b in (1, 3):
            x = torch.randn(b, 64)
            assert torch.allclose(c([(x, 0)], [], input=x), model(x), atol=1e-5, rtol=1e-5)
        c.warming, c.serving = False, True
        for b in (1, 2, SMALL_ROWS, SMALL_ROWS + 1, 40):
            x = torch.randn(b, 64)
            assert torch.allclose(c([(x, 0)], [], input=x), model(x), atol=1e-5, rtol=1e-5)
        assert c.misses == 0 and c.steps == 5
