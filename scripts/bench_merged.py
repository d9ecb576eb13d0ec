"""Merged cache figures, side by side in one process: single-stream latency and a hot-adapter workload.

    PYTHONPATH=server python scripts/bench_merged.py [--device cpu] [--json out.json]

Model: Llama, hidden 512, 8 layers, float32; 16 LoRA adapters of rank 16 on q, k, v, o.
Everything runs through the real engine (scheduler, runner, adapter cache), without gRPC:

- single stream: per-token decode latency of the base model, of an adapter unmerged and of
  the same kind of adapter merged, measured in interleaved rounds (median of rounds), so
  that load on a shared machine hits all three alike;
- throughput: generated tokens per second of a workload where 80% of the requests use one
  hot adapter and the rest spread over 15 others, all submitted at once, against the same
  workload on the base model alone, and against it with the merged path off; and the same
  requests all on the hot adapter (merged / unmerged), where merging shows most.

`run(...)` returns the figures as a dict, for the bench package to call.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramux.adapters.cache.adapter_cache import AdapterCache
from loramux.adapters.model.wrapped import WrappedModel
from loramux.adapters.store.store import AdapterStore
from loramux.config import EngineConfig
from loramux.engine.engine import Engine
from loramux.engine.request import Request, SamplingParams
from loramux.model import build_from_config, byte_tokenizer, load_base_model, tiny_llama_config

MB = 2**20
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def model_config():  # noqa: ANN201
    return tiny_llama_config(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=8, max_position_embeddings=2048)  # fmt: skip


def write_lora(root: Path, adapter_id: str, seed: int, rank: int = 16) -> None:
    cfg = model_config()
    h = cfg.hidden_size
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg.num_hidden_layers):
        for name in TARGETS:
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, h, generator=gen) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(h, rank, generator=gen) * 0.05
    d = root / adapter_id
    d.mkdir(parents=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(TARGETS), "bias": "none"}  # fmt: skip
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(d / "adapter_model.safetensors"))


class Bench:
    def __init__(self, root: Path, device: str, num_adapters: int) -> None:
        model_dir = root / "model"
        build_from_config(model_config(), seed=0).save_pretrained(model_dir)
        byte_tokenizer().save_pretrained(model_dir)
        for i in range(num_adapters):
            write_lora(root / "store", f"a{i}", seed=1000 + i)
        self.base = load_base_model(str(model_dir), device, "float32")
        wrapped = WrappedModel(self.base.model, num_adapters)
        store = AdapterStore(root / "store")
        store.scan()
        config = EngineConfig(
            max_running=32, max_device_adapters=num_adapters, merged_cache_mb=256, merge_threshold=1.0
        )  # explicit merges only: the figures compare fixed set-ups
        self.cache = AdapterCache(wrapped, store, 1024 * MB, merged_cache_bytes=256 * MB, merge_threshold=1.0)
        self.engine = Engine(self.base, wrapped, config, adapters=self.cache)
        self.cache.on_ready = self.engine.wake
        self.engine.start()
        self.modes: Counter[str] = Counter()
        plan = self.cache.merged.plan

        def counting_plan(requests):  # noqa: ANN001, ANN202
            slot, split = plan(requests)
            self.modes["split" if split else ("merged" if slot >= 0 else "unmerged")] += 1
            return slot, split

        self.cache.merged.plan = counting_plan

    def call(self, fn):  # noqa: ANN001, ANN201
        return self.engine.call(fn).result(120)

    def merge(self, adapter_id: str) -> None:
        deadline = time.monotonic() + 120
        while not self.call(lambda: self.cache.merge(adapter_id, pin=True)):
            if time.monotonic() > deadline:
                raise TimeoutError(adapter_id)
            time.sleep(0.01)

    def generate(self, jobs: list[tuple[str, list[int], int]]) -> list[list[float]]:
        """Submit all at once; each request's token arrival times."""
        times: list[list[float]] = [[] for _ in jobs]
        done = threading.Semaphore(0)
        for i, (adapter, prompt, n) in enumerate(jobs):
            r = Request(f"b{i}", prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), adapter_id=adapter)

            def sink(ev, i=i) -> None:  # noqa: ANN001
                if ev.token_ids:
                    times[i].append(time.perf_counter())
                if ev.final:
                    done.release()

            r.sink = sink
            self.engine.validate(r)
            self.engine.submit(r)
        for _ in jobs:
            done.acquire()
        return times

    def per_token(self, adapter: str, tokens: int) -> float:
        t = self.generate([(adapter, list(range(10, 26)), tokens)])[0]
        return (t[-1] - t[0]) / (len(t) - 1)

    def throughput(self, jobs: list[tuple[str, list[int], int]]) -> float:
        t0 = time.perf_counter()
        times = self.generate(jobs)
        return sum(len(t) for t in times) / (time.perf_counter() - t0)


def run(device: str = "cpu", rounds: int = 7, tokens: int = 64, requests: int = 64, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory(prefix="loramux-bench-merged-") as tmp:
        b = Bench(Path(tmp), device, num_adapters=16)
        try:
            return _measure(b, rounds, tokens, requests, seed)
        finally:
            b.engine.shutdown()
            b.cache.close()


def _measure(b: Bench, rounds: int, tokens: int, requests: int, seed: int) -> dict:
    for a in [f"a{i}" for i in range(16)]:  # every adapter resident: no loading inside a timing
        b.generate([(a, [5, 6, 7], 2)])
    b.merge("a0")
    b.generate([("", [5, 6, 7], 4), ("a0", [5, 6, 7], 4), ("a1", [5, 6, 7], 4)])  # warm-up
    lat: dict[str, list[float]] = {"base": [], "unmerged": [], "merged": []}
    runs = [("base", ""), ("unmerged", "a1"), ("merged", "a0")]
    for i in range(rounds):  # interleaved, order rotated: a busy neighbour slows all three alike
        for name, adapter in runs[i % 3 :] + runs[: i % 3]:
            lat[name].append(b.per_token(adapter, tokens))
    ratio = {k: statistics.median(x / y for x, y in zip(lat[k], lat["base"])) for k in ("merged", "unmerged")}
    ratio_min = {k: min(lat[k]) / min(lat["base"]) for k in ("merged", "unmerged")}  # least disturbed runs

    rng = random.Random(seed)
    hot = round(0.8 * requests)
    mix = ["a0"] * hot + [f"a{1 + i % 15}" for i in range(requests - hot)]
    rng.shuffle(mix)
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(8, 32))] for _ in range(requests)]
    workload = [(a, p, 32) for a, p in zip(mix, prompts)]
    base_only = [("", p, n) for _, p, n in workload]
    hot_only = [("a0", p, n) for _, p, n in workload]
    tput: dict[str, list[float]] = {k: [] for k in ("base", "hot_merged", "hot_unmerged", "hot_only_merged",
                                                    "hot_only_unmerged")}  # fmt: skip
    modes: Counter[str] = Counter()
    for _ in range(max(1, rounds // 3)):
        tput["base"].append(b.throughput(base_only))
        b.modes.clear()
        tput["hot_merged"].append(b.throughput(workload))
        modes += b.modes
        tput["hot_only_merged"].append(b.throughput(hot_only))
        b.call(lambda: b.cache.unmerge("a0"))
        tput["hot_unmerged"].append(b.throughput(workload))
        tput["hot_only_unmerged"].append(b.throughput(hot_only))
        b.merge("a0")
    tp = {k: statistics.median(v) for k, v in tput.items()}
    merged_mb = b.cache.merged.entries[next(iter(b.cache.merged.entries))].nbytes / MB
    return {
        "model": "llama hidden 512, 8 layers, float32; LoRA r=16 on q,k,v,o",
        "device": str(b.base.device),
        "torch_threads": torch.get_num_threads(),
        "per_token_ms": {k: 1000 * statistics.median(v) for k, v in lat.items()},
        "latency_ratio_vs_base": ratio,  # median over rounds of (config / base in the same round)
        "latency_ratio_of_fastest": ratio_min,
        "throughput_tok_s": tp,
        "throughput_vs_base": {k: tp[k] / tp["base"] for k in tp if k != "base"},
        "mixed_batch_modes": dict(modes),  # per-forward decisions during the merged workload runs
        "merged_mb_per_adapter": merged_mb,
        "hot_share": mix.count("a0") / len(mix),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    result = run(a.device, a.rounds, a.tokens, a.requests)
    text = json.dumps(result, indent=2)
    print(text)
    if a.json is not None:
        a.json.write_text(text)


if __name__ == "__main__":
    main()
