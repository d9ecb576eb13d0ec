"""A bounded soak: everything at once over 2 device slots and a 1 MB host cache.

Client threads send unary and streaming requests (base model, LoRA, DoRA, IA3), cancel
streams, send requests with deadlines too short to finish, while an admin thread
overwrites, uploads, deletes, pins, loads and unloads adapters. The work is fixed by
seeds and counts, not by a clock: each client thread sends `--soak-requests` requests
(default 24, in two halves), and the admin thread runs rounds of all four of its actions
(in a seeded order) until the clients are done, at least one round per half. Only the
interleaving depends on the machine, and no assertion depends on it. A larger
`--soak-requests` makes it longer.

It asserts: every completed output equals a PEFT reference (for an overwritten id, the
reference of one of its versions, never a mix); no request with a long deadline runs
into it (nothing hangs); the metrics' counters agree with what the clients saw; every
KV block and device slot is free at the end; the process's RSS does not grow between
the two halves of the run.
"""

from __future__ import annotations

import hashlib
import random
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
import torch
from harness import ServerThread, wait_until
from peft import IA3Config, LoraConfig
from peft_helpers import make_peft_adapter, transformers_greedy

from loramux.model import tiny_llama_config
from loramux.v1 import loramux_pb2 as pb

KINDS = {
    "lora-a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora-b": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True),
    "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "temp": LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]),
}
PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44], [7] * 9]
N = 8
LONG = 60.0  # the deadline of a request that must complete: running into it means something hung
Code = grpc.StatusCode


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def greedy(model: torch.nn.Module, ids: list[int]) -> list[int]:
    return transformers_greedy(model, ids, N)


class Soak:
    def __init__(self, s: ServerThread, files: dict[str, tuple[str, bytes]], refs: dict[str, list[list[list[int]]]]):
        self.s, self.files, self.refs = s, files, refs
        self.seen: Counter[str] = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def note(self, what: str, failure: str | None = None) -> None:
        with self.lock:
            self.seen[what] += 1
            if failure:
                self.failures.append(failure)

    def put(self, adapter_id: str, kind: str) -> None:
        config, data = self.files[kind]
        sha = hashlib.sha256(data).hexdigest()
        manifest = pb.AdapterManifest(
            adapter_id=adapter_id, config_json=config, overwrite=True, weights_sha256=sha, weights_size=len(data)
        )
        msgs = [pb.UploadAdapterRequest(manifest=manifest), pb.UploadAdapterRequest(chunk=data)]
        self.s.adapters.UploadAdapter(iter(msgs), timeout=LONG)

    def client(self, seed: int, requests: int) -> None:
        rng = random.Random(seed)
        for _ in range(requests):
            adapter = rng.choice(["", "lora", "dora", "ia3", "temp"])
            p = rng.randrange(len(PROMPTS))
            req = pb.GenerateRequest(adapter_id=adapter, prompt_token_ids=PROMPTS[p],
                                     params=pb.SamplingParams(max_new_tokens=N, ignore_eos=True))  # fmt: skip
            action = rng.random()
            try:
                if action < 0.1:  # a stream cancelled after its first message (so it surely was admitted)
                    req.params.max_new_tokens = 200
                    stream = self.s.gen.GenerateStream(req, timeout=LONG)
                    next(stream)
                    stream.cancel()
                    self.note("cancelled")
                    continue
                if action < 0.2:  # a deadline too short to finish (not for temp: its NOT_FOUND could race it)
                    req.adapter_id = rng.choice(["", "lora", "dora", "ia3"])
                    req.params.max_new_tokens = 300
                    self.s.gen.Generate(req, timeout=rng.uniform(0.05, 0.3))
                    self.note("ok-despite-deadline")
                    continue
                if action < 0.6:
                    ids = list(self.s.gen.Generate(req, timeout=LONG).token_ids)
                else:
                    ids = [t for m in self.s.gen.GenerateStream(req, timeout=LONG) for t in m.token_ids]
            except grpc.RpcError as e:
                if action < 0.2 and e.code() == Code.DEADLINE_EXCEEDED:
                    self.note("deadline")
                elif e.code() == Code.NOT_FOUND and adapter == "temp":
                    self.note("not_found")
                else:
                    self.note("failed", f"{adapter or 'base'}: {e.code().name} {e.details()}")
                continue
            ok = any(ids == ref[p] for ref in self.refs[adapter])
            self.note("ok", None if ok else f"{adapter or 'base'} prompt {p}: {ids} is no reference")

    def admin(self, seed: int) -> None:
        rng = random.Random(seed)
        version = 0  # which of the two LoRAs "lora" holds
        while not self.stop.is_set():  # checked per round: every action runs at least once
            for action in rng.sample(["overwrite", "temp", "pin", "unload"], 4):
                if action == "overwrite":
                    version ^= 1
                self.admin_action(rng, action, version)
                self.stop.wait(rng.uniform(0.05, 0.3))  # a pause while clients run (none once they are done)

    def admin_action(self, rng: random.Random, action: str, version: int) -> None:
        try:
            if action == "overwrite":
                self.put("lora", ("lora-a", "lora-b")[version])
            elif action == "temp":
                if rng.random() < 0.5:
                    self.s.adapters.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="temp"), timeout=LONG)
                else:
                    self.put("temp", "temp")
            elif action == "pin":
                self.s.adapters.LoadAdapter(pb.LoadAdapterRequest(adapter_id="dora", pin=True), timeout=LONG)
            else:
                self.s.adapters.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="dora"), timeout=LONG)
            self.note(f"admin-{action}")
        except grpc.RpcError as e:
            if not (action == "temp" and e.code() == Code.NOT_FOUND):
                self.note("admin-failed", f"{action}: {e.code().name} {e.details()}")

    def run(self, requests: int, seed: int) -> None:
        """Five client threads send `requests` requests each; the admin thread runs until they are done."""
        self.stop.clear()
        clients = [threading.Thread(target=self.client, args=(seed * 100 + i, requests)) for i in range(5)]
        admin = threading.Thread(target=self.admin, args=(seed,))
        for t in [*clients, admin]:
            t.start()
        for t in clients:
            t.join(LONG * requests)  # a bound that only a hang reaches (each request's deadline is LONG)
        self.stop.set()
        admin.join(LONG * 8)
        assert not any(t.is_alive() for t in [*clients, admin]), "a client thread hung"


def scrape(s: ServerThread) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.server.metrics_port}/metrics", timeout=30).read().decode()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and ln[0] != "#"}


def test_soak(tiny_llama_dir: Path, tmp_path: Path, reference_llama, request: pytest.FixtureRequest) -> None:
    requests = int(request.config.getoption("--soak-requests"))
    files, models = {}, {}
    for i, (kind, cfg) in enumerate(KINDS.items()):
        models[kind] = make_peft_adapter(tiny_llama_config(), cfg, tmp_path / kind, seed=70 + i)
        weights = next(p for p in (tmp_path / kind).iterdir() if p.suffix == ".safetensors").read_bytes()
        files[kind] = ((tmp_path / kind / "adapter_config.json").read_text(), weights)
    refs = {
        "": [[greedy(reference_llama, ids) for ids in PROMPTS]],
        "lora": [[greedy(models[k], ids) for ids in PROMPTS] for k in ("lora-a", "lora-b")],
        **{k: [[greedy(models[k], ids) for ids in PROMPTS]] for k in ("dora", "ia3", "temp")},
    }
    with ServerThread(tiny_llama_dir, store=tmp_path / "store", max_device_adapters=2, host_cache_mb=1) as s:
        soak = Soak(s, files, refs)
        for adapter_id, kind in (("lora", "lora-a"), ("dora", "dora"), ("ia3", "ia3"), ("temp", "temp")):
            soak.put(adapter_id, kind)
        before = scrape(s)
        soak.run(max(1, requests // 2), seed=1)
        rss_half = rss_mb()
        soak.run(max(1, requests - requests // 2), seed=2)
        rss_end = rss_mb()
        s.adapters.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="dora"), timeout=LONG)
        engine = s.engine
        wait_until(lambda: engine.idle, "the engine to go idle")
        assert engine.pool.num_used == 0  # every KV block freed (cached prefixes are idle, not held)
        slots = engine.call(lambda: [(x.refs, x.reserved_for) for x in s.server.cache.slots]).result(30)
        assert slots == [(0, None), (0, None)]
        after = scrape(s)

    assert not soak.failures, soak.failures[:10]
    seen = soak.seen
    print("soak:", dict(seen), "rss MB:", round(rss_half), "->", round(rss_end))
    assert seen["ok"] and seen["admin-overwrite"] and seen["admin-pin"] and seen["admin-unload"], seen

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    server = {st: delta(f'loramux_requests_total{{status="{st}"}}') for st in
              ("ok", "cancelled", "deadline", "rejected", "error")}  # fmt: skip
    assert server["error"] == 0, server
    assert server["rejected"] == seen["not_found"] == delta('loramux_requests_rejected_total{reason="not_found"}')
    # A request the client gave up on (cancel, deadline) may have finished first; one whose
    # deadline passed before it reached the server is never counted.
    lost = seen["cancelled"] + seen["deadline"]
    assert seen["ok"] + seen["ok-despite-deadline"] <= server["ok"] <= seen["ok"] + seen["ok-despite-deadline"] + lost
    assert server["cancelled"] + server["deadline"] <= lost
    assert sum(server.values()) <= sum(seen[k] for k in ("ok", "ok-despite-deadline", "not_found")) + lost
    assert rss_end - rss_half < 64, (rss_half, rss_end)  # MB; a leak per request would show here
