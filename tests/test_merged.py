"""The merged cache: merged W0 + delta weights equal PEFT, alone and in mixed batches; budget, policy, lifecycle."""

from __future__ import annotations

import hashlib
import random
import shutil
import time
import urllib.request

import pytest
import torch
from harness import ServerThread
from peft import IA3Config, LoraConfig
from peft_helpers import flat_batch, greedy, make_peft_adapter, reference_logits

from loramux.adapters.cache import merged as merged_mod
from loramux.adapters.cache.merge_policy import BatchShape, MergeCost, Mode, TrafficWindow, choose_mode
from loramux.adapters.cache.merged import MergedCache
from loramux.adapters.cache.slot import Slot
from loramux.adapters.formats.loader import load_adapter_dir
from loramux.adapters.model import linear as layers_mod
from loramux.adapters.model.wrapped import WrappedModel
from loramux.engine.forward_context import BASE_SLOT, AdapterContext
from loramux.engine.runner import Runner
from loramux.engine.step_cost import forward_macs
from loramux.model import build_from_config, tiny_gpt2_config, tiny_llama_config
from loramux.v1 import loramux_pb2 as pb

ATOL = 1e-4  # float32; a wrong or doubly applied delta is off by >1e-2
MB = 2**20

ADAPTERS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "rslora": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True),
    "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("merged-store")
    models = {name: make_peft_adapter(tiny_llama_config(), cfg, root / name, seed=300 + i)
              for i, (name, cfg) in enumerate(ADAPTERS.items())}  # fmt: skip
    return root, models


# --- model level ----------------------------------------------------------------------------


class Loaded:
    """A wrapped model with adapters in slots and a MergedCache over them, no server."""

    def __init__(self, config, dirs: dict[str, object], budget: int = 64 * MB) -> None:
        self.wrapped = WrappedModel(build_from_config(config, seed=0), num_slots=len(dirs))
        self.slots = [Slot(i) for i in range(len(dirs))]
        self.index = {}
        for i, (name, d) in enumerate(dirs.items()):
            adapter = load_adapter_dir(d, self.wrapped)
            adapter.install(self.wrapped, i)
            self.slots[i].key, self.slots[i].adapter = (name, "sha"), adapter
            self.index[name] = i
        self.cache = MergedCache(self.wrapped, self.slots, budget, threshold=0.5, window_tokens=64)

    def merge(self, name: str) -> None:
        key = (name, "sha")
        self.cache.merge(key, self.index[name])
        deadline = time.monotonic() + 60
        while not self.cache.merge(key, self.index[name]):
            if time.monotonic() > deadline:
                raise TimeoutError("merge did not finish")
            time.sleep(0.005)

    @torch.no_grad()
    def logits(self, seqs: list[torch.Tensor], slots: list[int], merged_slot: int) -> list[torch.Tensor]:
        ids, mask, pos = flat_batch(seqs)
        rows = [s for seq, s in zip(seqs, slots) for _ in range(seq.shape[0])]
        self.wrapped.holder.set(AdapterContext.from_row_slots(rows, ids.device, merged_slot=merged_slot))
        try:
            out = self.wrapped.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0]
        finally:
            self.wrapped.holder.set(None)
        return list(out.split([s.shape[0] for s in seqs]))


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_merged_alone_equals_peft(store, name):
    root, models = store
    m = Loaded(tiny_llama_config(), {name: root / name})
    m.merge(name)
    assert m.cache.state((name, "sha"))
    w0 = {n: lay.base_layer.weight.clone() for n, lay in m.wrapped.linears.items()}
    ids = torch.tensor([b + 3 for b in b"merged weights"])
    got = m.logits([ids], [0], merged_slot=0)[0]
    torch.testing.assert_close(got, reference_logits(models[name], ids), atol=ATOL, rtol=0)
    steps = greedy(lambda x: m.logits([x], [0], merged_slot=0)[0], ids[:4], 8)
    assert steps == greedy(lambda x: reference_logits(models[name], x), ids[:4], 8)
    # the merged path really ran (no adapter arithmetic) and W0 was never written
    assert any(0 in lay.merged for lay in m.wrapped.linears.values())
    assert all(torch.equal(w0[n], lay.base_layer.weight) for n, lay in m.wrapped.linears.items())


@pytest.mark.parametrize("merged_name", ["lora", "rslora", "dora"])
def test_mixed_batch_with_merged_unmerged_and_base_rows(store, merged_name, reference_llama):
    """dLoRA subtract (LoRA) or per-layer fallback (DoRA): every row exact, whatever its slot."""
    root, models = store
    names = ["lora", "rslora", "dora"]
    m = Loaded(tiny_llama_config(), {n: root / n for n in names})
    m.merge(merged_name)
    rng = random.Random(1)
    seqs = [torch.tensor([rng.randrange(3, 259) for _ in range(rng.randint(3, 9))]) for _ in range(6)]
    slots = [BASE_SLOT, BASE_SLOT, 0, 1, 1, 2]  # grouped by slot, as the runner orders rows
    got = m.logits(seqs, slots, merged_slot=m.index[merged_name])
    for seq, slot, logits in zip(seqs, slots, got):
        oracle = reference_llama if slot == BASE_SLOT else models[names[slot]]
        torch.testing.assert_close(logits, reference_logits(oracle, seq), atol=ATOL, rtol=0)


def test_gpt2_conv1d_lora_with_bias_merges(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, lora_bias=True, target_modules=["c_attn", "c_fc"])
    model = make_peft_adapter(tiny_gpt2_config(), cfg, tmp_path / "g", seed=7)
    m = Loaded(tiny_gpt2_config(), {"g": tmp_path / "g"})
    m.merge("g")
    ids = torch.tensor([5, 9, 77, 200, 31])
    base_rows = torch.tensor([8, 8, 9])
    got = m.logits([base_rows, ids], [BASE_SLOT, 0], merged_slot=0)
    torch.testing.assert_close(got[1], reference_logits(model, ids), atol=ATOL, rtol=0)
    plain = build_from_config(tiny_gpt2_config(), seed=0).eval()
    torch.testing.assert_close(got[0], reference_logits(plain, base_rows), atol=ATOL, rtol=0)


def test_budget_evicts_least_recently_used(store):
    root, _ = store
    names = ["lora", "rslora", "dora"]
    m = Loaded(tiny_llama_config(), {n: root / n for n in names}, budget=1)
    sizes = {}
    for n in names:  # measure each merged size alone
        m.cache.budget = 64 * MB
        m.merge(n)
        sizes[n] = m.cache.entries[(n, "sha")].nbytes
        lay = m.wrapped.linears
        assert sizes[n] == sum(lay[x].base_layer.weight.nbytes for x in lay if lay[x].deltas[m.index[n]] is not None)
        m.cache.drop((n, "sha"), "unmerge")
    # lora + dora fit; adding rslora needs one evicted, and evicting dora is enough
    m.cache.budget = sizes["lora"] + sizes["rslora"] + sizes["dora"] // 2
    m.merge("lora")
    m.merge("dora")
    m.cache.entries[("lora", "sha")].last_used = time.monotonic() + 1  # lora used most recently
    m.merge("rslora")
    assert set(m.cache.entries) == {("lora", "sha"), ("rslora", "sha")}
    assert ("dora", "sha") not in m.cache.entries  # the least recently used one went
    assert not any(2 in lay.merged for lay in m.wrapped.linears.values())  # dora (slot 2) detached
    # pinned merged copies are never evicted: nothing fits then
    m.slots[0].pinned = m.slots[1].pinned = True
    with pytest.raises(ValueError, match="no room"):
        m.cache.merge(("dora", "sha"), 2)


@pytest.mark.parametrize("tied", [False, True])
def test_forward_macs_counts_each_product_once(tied: bool):
    # one row's MACs: the decoder layers' projections and the LM head; the embedding table is a lookup,
    # counted only as the head it also is when tied
    model = build_from_config(tiny_llama_config(tie_word_embeddings=tied), seed=0)
    cfg = model.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)  # k / v projections' width
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i  # q, o; k, v; gate, up, down
    assert forward_macs(model) == cfg.num_hidden_layers * per_layer + cfg.vocab_size * h


def test_cost_model_and_traffic_window():
    lora = MergeCost(row_macs=16 * 1024 * 4, layers=8, subtractable=True)
    dora = MergeCost(row_macs=16 * 1024 * 4, layers=8, subtractable=False)
    fwd = 25_000_000  # P: one row's MACs through a hidden-512, 8-layer Llama
    assert choose_mode(BatchShape(10, 0, 0), dora, fwd, "cpu") is Mode.MERGED
    assert choose_mode(BatchShape(0, 10, 1), lora, fwd, "cpu") is Mode.UNMERGED
    assert choose_mode(BatchShape(40, 2, 1), lora, fwd, "cpu") is Mode.MERGED  # few others: subtract
    # a split costs a forward's fixed cost (FORWARD_ROWS rows of the model): worth it only for deltas
    # that cost more than that, many rows each
    assert choose_mode(BatchShape(40000, 40000, 2), lora, fwd, "cpu") is Mode.SPLIT
    assert choose_mode(BatchShape(40000, 2, 1), dora, fwd, "cpu") is Mode.SPLIT  # DoRA: no subtract
    assert choose_mode(BatchShape(4000, 4000, 2), lora, fwd, "cpu") is Mode.UNMERGED
    assert choose_mode(BatchShape(1, 40, 1), dora, fwd, "cpu") is Mode.UNMERGED
    # beside other LoRA rows an unmerged delta rides in their spans (no ops of its own): no subtract then
    assert choose_mode(BatchShape(30, 2, 1), lora, fwd, "cpu") is Mode.MERGED
    assert choose_mode(BatchShape(30, 2, 1, joins_batched=True), lora, fwd, "cpu") is Mode.UNMERGED
    # measured (scripts/calibrate_merge_policy.py --rank 128, the bench's model, P = 11.7M): 64 decode rows,
    # 16 or 32 of them on the merged rank-128 adapter on q, k, v, o, ran 7-16% slower split than unmerged,
    # which the earlier split price (30 ops per decoder layer) picked
    r128 = MergeCost(row_macs=128 * (1024 + 768 + 768 + 1024) * 4, layers=16, subtractable=True)
    for merged_rows in (16, 32):
        shape = BatchShape(merged_rows, 64 - merged_rows, 1, joins_batched=True)
        assert choose_mode(shape, r128, 11_732_480, "cpu") is Mode.UNMERGED
    w = TrafficWindow(100)
    w.record({"a": 20, None: 10})
    assert w.hot(0.5) == []  # under half a window: no judgement yet
    w.record({"a": 40, "b": 10})
    assert w.hot(0.5) == ["a"]
    for _ in range(10):
        w.record({"b": 10, None: 10})
    assert w.total <= 120 and w.cold("a", 0.5) and w.hot(0.5) == ["b"]  # b: 50%, base 50%


# --- through the server ---------------------------------------------------------------------


def peft_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def req(ids: list[int], n: int, adapter: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=adapter, prompt_token_ids=ids, params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True)
    )


def metric(s: ServerThread, prefix: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.server.metrics_port}/metrics").read().decode()
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix))


def engine_merge(s: ServerThread, adapter_id: str) -> None:
    deadline = time.monotonic() + 60
    while not s.engine.call(lambda: s.server.cache.merge(adapter_id, pin=True)).result(30):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{adapter_id} did not merge")
        time.sleep(0.01)


@pytest.mark.parametrize("mode", [Mode.MERGED, Mode.SPLIT])
def test_server_merge_unmerge_in_flight_all_exact(store, tiny_llama_dir, reference_llama, monkeypatch, mode):
    """lora/rslora/dora merged in turn while mixed requests (merged, unmerged, base) run: every token exact."""
    root, models = store
    monkeypatch.setattr(merged_mod, "choose_mode", lambda shape, *a: Mode.MERGED if not shape.other_rows else mode)
    calls = {"split": 0, "subtract": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(Runner, "_run_split", counting("split", Runner._run_split))
    monkeypatch.setattr(layers_mod, "segment_unmerge", counting("subtract", layers_mod.segment_unmerge))
    rng = random.Random(5)
    names = ["lora", "rslora", "dora", "ia3", ""]
    cases = [([rng.randrange(3, 259) for _ in range(rng.randint(2, 12))], rng.randint(6, 14), names[i % 5])
             for i in range(15)]  # fmt: skip
    with ServerThread(tiny_llama_dir, store=root, max_device_adapters=4, merged_cache_mb=4) as s:
        cache = s.server.cache
        futures = [s.gen.Generate.future(req(ids, n, a)) for ids, n, a in cases[:5]]
        engine_merge(s, "lora")
        futures += [s.gen.Generate.future(req(ids, n, a)) for ids, n, a in cases[5:10]]
        engine_merge(s, "dora")
        engine_merge(s, "rslora")
        s.engine.call(lambda: cache.unmerge("dora")).result(30)
        futures += [s.gen.Generate.future(req(ids, n, a)) for ids, n, a in cases[10:]]
        for (ids, n, a), fut in zip(cases, futures):
            want = peft_greedy(models[a] if a else reference_llama, ids, n)
            assert list(fut.result(timeout=300).token_ids) == want, a
        # alone, each merged adapter equals PEFT too
        ids = [b + 3 for b in b"merged!"]
        for a in ("lora", "rslora"):
            assert list(s.gen.Generate(req(ids, 10, a)).token_ids) == peft_greedy(models[a], ids, 10), a
        sha = {a: s.server.store.get(a).sha256 for a in ("lora", "rslora", "dora")}
        assert cache.state("lora", sha["lora"]) == ("merged", True)
        assert cache.state("dora", sha["dora"])[0] == "device"
        assert metric(s, "loramux_merged_batches_total") > 0
        assert metric(s, 'loramux_adapters_resident{tier="merged"}') == 2
    assert calls["split" if mode is Mode.SPLIT else "subtract"] > 0  # the chosen mixed-batch path really ran
    assert calls["subtract" if mode is Mode.SPLIT else "split"] == 0


def test_server_auto_policy_and_forget(store, tiny_llama_dir, tmp_path, reference_llama):
    """Threshold 0.5: the adapter with most traffic gets merged in the background; overwrite/delete drop it."""
    root, models = store
    own = tmp_path / "store"
    for n in ("lora", "rslora", "dora"):
        shutil.copytree(root / n, own / n)
    rng = random.Random(9)
    with ServerThread(
        tiny_llama_dir, store=own, max_device_adapters=3, merged_cache_mb=4, merge_threshold=0.5, merge_window_tokens=64
    ) as s:
        cache = s.server.cache
        cases = [([rng.randrange(3, 259) for _ in range(6)], 8, "lora" if i % 5 else ["rslora", ""][i % 2])
                 for i in range(12)]  # fmt: skip
        for ids, n, a in cases:  # sequentially: the share is judged as traffic comes
            got = list(s.gen.Generate(req(ids, n, a)).token_ids)
            assert got == peft_greedy(models[a] if a else reference_llama, ids, n), a
        sha = s.server.store.get("lora").sha256
        assert cache.state("lora", sha)[0] == "merged"
        assert metric(s, 'loramux_merge_decisions_total{action="merge"}') >= 1
        assert metric(s, "loramux_merged_batches_total") > 0
        # overwrite (as UploadAdapter does: publish, then cache.forget on the engine thread): the merged
        # copy of the old weights goes, and the new weights serve exactly
        weights = (root / "rslora" / "adapter_model.safetensors").read_bytes()
        config = (root / "rslora" / "adapter_config.json").read_text()
        session = s.server.store.begin_upload(
            "lora", config, hashlib.sha256(weights).hexdigest(), len(weights), True, 64 * MB
        )
        with session:
            session.write(weights)
            session.finish(s.server.validate_adapter)
        s.engine.call(lambda: cache.forget("lora")).result(30)
        assert not any(k[1] == sha for k in cache.merged.entries)
        ids = [7, 8, 9, 10]
        assert list(s.gen.Generate(req(ids, 8, "lora")).token_ids) == peft_greedy(models["rslora"], ids, 8)
        # delete a merged adapter: its merged copy goes too
        engine_merge(s, "dora")
        assert any(k[0] == "dora" for k in cache.merged.entries)
        s.server.store.delete("dora")
        s.engine.call(lambda: cache.forget("dora")).result(30)
        assert not any(k[0] == "dora" for k in cache.merged.entries)
        assert metric(s, 'loramux_adapters_resident{tier="merged"}') == len(cache.merged.entries)


def test_load_adapter_merge_over_grpc(store, tiny_llama_dir):
    """LoadAdapter(merge=true) merges and pins (ADAPTER_STATE_MERGED); UnloadAdapter releases the merged copy."""
    root, models = store
    with ServerThread(tiny_llama_dir, store=root, max_device_adapters=2, merged_cache_mb=4) as s:
        m = s.adapters.LoadAdapter(pb.LoadAdapterRequest(adapter_id="dora", merge=True))
        assert m.state == pb.ADAPTER_STATE_MERGED and m.pinned
        ids = [11, 12, 13]
        assert list(s.gen.Generate(req(ids, 8, "dora")).token_ids) == peft_greedy(models["dora"], ids, 8)
        assert metric(s, "loramux_merged_batches_total") > 0
        m = s.adapters.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="dora"))
        assert m.state != pb.ADAPTER_STATE_MERGED and not m.pinned
        assert not s.server.cache.merged.entries


def test_merge_refusals(store):
    """Merged cache off, or an adapter that changes no weight (bottleneck, soft prompt): ValueError."""
    root, _ = store
    m = Loaded(tiny_llama_config(), {"lora": root / "lora"}, budget=0)
    with pytest.raises(ValueError, match="off"):
        m.cache.merge(("lora", "sha"), 0)
    m.cache.budget = 64 * MB
    m.slots[0].adapter.info.mergeable = False
    with pytest.raises(ValueError, match="cannot be merged"):
        m.cache.merge(("lora", "sha"), 0)
    m.cache.budget = 1
    m.slots[0].adapter.info.mergeable = True
    with pytest.raises(ValueError, match="more than --merged-cache-mb"):
        m.cache.merge(("lora", "sha"), 0)
