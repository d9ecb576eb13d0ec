"""LoRA, DoRA and IA3 adapters served in mixed batches through the real server; PEFT is the oracle."""

from __future__ import annotations

import random
import urllib.request

import pytest
import torch
from harness import Hold, ServerThread, wait_until
from peft import IA3Config, LoraConfig
from peft_helpers import make_peft_adapter

from loramux.model import tiny_llama_config
from loramux.v1 import loramux_pb2 as pb

ADAPTERS = {
    "lora-attn": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora-all-rs": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "lora-patterns": LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
        rank_pattern={"o_proj": 2},
        alpha_pattern={"down_proj": 12},
        layers_to_transform=[1],
    ),
    "lora-regex": LoraConfig(r=6, lora_alpha=6, target_modules=r".*\.mlp\.(gate|up)_proj"),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True),
    "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with one adapter of each kind, and their PEFT models as the oracle."""
    root = tmp_path_factory.mktemp("store")
    models = {}
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        models[name] = make_peft_adapter(tiny_llama_config(), cfg, root / name, seed=100 + i)
    return root, models


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


def test_each_kind_alone_equals_peft(store, tiny_llama_dir):
    root, models = store
    with ServerThread(tiny_llama_dir, store=root, max_device_adapters=8) as s:
        ids = [b + 3 for b in b"adapters!"]
        for name, model in models.items():
            got = list(s.gen.Generate(req(ids, 12, name)).token_ids)
            assert got == peft_greedy(model, ids, 12), name
        # The adapters really change the output: none of them equals the base model.
        base = list(s.gen.Generate(req(ids, 12)).token_ids)
        assert all(peft_greedy(m, ids, 12) != base for m in models.values())


def test_all_kinds_in_flight_with_base_rows_and_few_slots(store, tiny_llama_dir, reference_llama):
    """6 adapters over 2 device slots, 30 concurrent requests: all exact; evictions happen."""
    root, models = store
    rng = random.Random(3)
    names = [*models, ""]
    cases = []
    for i in range(30):
        ids = [rng.randrange(3, 259) for _ in range(rng.randint(2, 24))]
        cases.append((ids, rng.randint(1, 16), names[i % len(names)]))
    with ServerThread(tiny_llama_dir, store=root, max_device_adapters=2) as s:
        futures = [s.gen.Generate.future(req(ids, n, a)) for ids, n, a in cases]
        for (ids, n, a), fut in zip(cases, futures):
            want = peft_greedy(models[a] if a else reference_llama, ids, n)
            assert list(fut.result(timeout=300).token_ids) == want, a
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{s.server.metrics_port}/metrics").read().decode()
    device_evictions = 'loramux_adapter_cache_evictions_total{tier="device"}'
    evictions = [ln for ln in metrics.splitlines() if ln.startswith(device_evictions)]
    assert evictions and float(evictions[0].split()[-1]) >= 4
    stored = [ln for ln in metrics.splitlines() if ln.startswith('loramux_adapters_resident{tier="store"}')]
    assert float(stored[0].split()[-1]) == len(models)


def test_bad_adapter_in_store_fails_only_its_request(store, tiny_llama_dir, tmp_path):
    import shutil

    root, models = store
    bad_root = tmp_path / "store"
    shutil.copytree(root / "lora-attn", bad_root / "good")
    # A LoRA made for a bigger model: the shapes do not fit this base model.
    make_peft_adapter(tiny_llama_config(hidden_size=96), ADAPTERS["lora-attn"], bad_root / "wrong-shape", seed=1)
    with ServerThread(tiny_llama_dir, store=bad_root) as s:
        import grpc

        with pytest.raises(grpc.RpcError) as e:
            s.gen.Generate(req([5, 6, 7], 4, "wrong-shape"))
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        got = list(s.gen.Generate(req([5, 6, 7], 6, "good")).token_ids)
        assert got == peft_greedy(models["lora-attn"], [5, 6, 7], 6)


def test_waiting_for_a_slot_is_fair(store, tiny_llama_dir):
    """One slot held by a long request: a request for another adapter reserves it, and a later
    request for the resident adapter does not pass the waiting one (no starvation)."""
    import threading

    root, _ = store
    done: list[str] = []

    def run(name: str, request: pb.GenerateRequest) -> None:
        s.gen.Generate(request, timeout=300)
        done.append(name)

    with ServerThread(tiny_llama_dir, store=root, max_device_adapters=1) as s:
        first = s.gen.GenerateStream(req([5, 6], 120, "lora-attn"))
        next(first)  # lora-attn holds the only slot
        hold = Hold(s.engine)  # the first request cannot finish while the others arrive
        waiting = threading.Thread(target=run, args=("dora", req([7, 8], 4, "dora")))
        waiting.start()
        wait_until(lambda: s.engine.num_waiting == 1, "the dora request to be queued")
        hold.release(steps=1)  # one step: dora finds the slot held and reserves it; then held again
        assert [slot.reserved_for for slot in s.server.cache.slots] == ["dora"]
        later = threading.Thread(target=run, args=("lora-later", req([9, 10], 4, "lora-attn")))
        later.start()
        wait_until(lambda: s.engine.num_waiting == 2, "the later request to be queued behind dora")
        queued = {r.prompt_ids[0]: r for r in [*s.engine.scheduler.waiting, *s.engine._inbox]}  # engine held
        hold.release()
        for _ in first:
            pass
        waiting.join(120)
        later.join(120)
    assert sorted(done) == ["dora", "lora-later"]
    # the order on the engine's own clock, step by step (the client threads may wake in either order):
    # the later request's first token comes after dora's last one
    dora, again = queued[7], queued[9]
    assert dora.last_token_at is not None and again.first_token_at is not None
    assert dora.last_token_at < again.first_token_at
