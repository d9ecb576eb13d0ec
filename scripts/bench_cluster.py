"""The mixed workload through `loramux cluster` with 2 replicas against 1, side by side.

One Ray cluster on this machine runs two applications built by loramux.cluster.app:
"one" (1 replica) and "two" (2 replicas), each replica with the same torch thread
count. The same requests (the bench's mixed workload: LoRA adapters, uniform
popularity, a closed loop of clients) go to each in interleaved rounds; the
script prints every round's throughput, the ratio two/one per round and its
median, the adapter loads of each replica and the router's spill count. With
`--api http` the same requests stream over the OpenAI-compatible API through the
cluster's HTTP front instead of gRPC.

    .venv/bin/python scripts/bench_cluster.py --rounds 3 [--api http]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import ray
from ray import serve

from loramux.bench.client import run_requests
from loramux.bench.http_client import run_http_requests
from loramux.bench.prom import scrape, total
from loramux.bench.synthetic import AdapterSpec, ModelShape, write_adapter, write_synthetic_model
from loramux.bench.workload import WorkloadSpec, make_requests
from loramux.cluster.app import build
from loramux.cluster.config import ClusterConfig
from loramux.config import EngineConfig, ServerConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="cpu")
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-ongoing-requests", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--api", choices=["grpc", "http"], default="grpc", help="the front the clients call")
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="loramux-bench-cluster-"))
    model = write_synthetic_model(a.preset, work / "model")
    shape = ModelShape.of(model)
    ids = [f"lora-{i}" for i in range(a.adapters)]
    for i, adapter_id in enumerate(ids):
        write_adapter(AdapterSpec(adapter_id, rank=a.rank, seed=i), shape, work / "store")
    requests = make_requests(WorkloadSpec(num_requests=a.requests, adapters=ids, clients=a.clients))

    ray.init(address="local", num_cpus=3 * a.threads, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)  # fmt: skip
    serve.start(proxy_location="Disabled")
    fronts = {}
    for name, replicas in (("one", 1), ("two", 2)):
        config = ServerConfig(model=str(model), store=work / "store", port=0, metrics_port=0, http_port=0,
                              device="cpu", threads=a.threads, engine=EngineConfig())  # fmt: skip
        cluster = ClusterConfig(replicas=replicas, max_ongoing_requests=a.max_ongoing_requests)
        fronts[name] = serve.run(build(config, cluster), name=name, route_prefix=None)
    addresses = {n: f.addresses.remote().result() for n, f in fronts.items()}

    def run(n: str):  # noqa: ANN202
        if a.api == "http":
            return run_http_requests(f"http://{addresses[n]['http']}", n, requests, a.clients)
        return run_requests(addresses[n]["grpc"], n, requests, a.clients)

    # A first, untimed pass over every configuration: cold adapter loads are not throughput.
    for n in fronts:
        run(n)
    rounds: dict[str, list[float]] = {"one": [], "two": []}
    for _ in range(a.rounds):
        for n in fronts:
            r = run(n)
            assert not r.errors, r.errors[:3]
            rounds[n].append(r.throughput)
    ratios = [t / o for o, t in zip(rounds["one"], rounds["two"])]
    loads = {}
    for n, f in fronts.items():
        loads[n] = {
            str(m["rank"]): total(scrape(m["metrics"]), "loramux_adapter_load_seconds_count", tier="store")
            for m in f.replicas.remote().result()
        }
    spilled = {n: total(scrape(addresses[n]["metrics"]), "loramux_cluster_spilled_total") for n in fronts}
    print(json.dumps({
        "api": a.api,
        "workload": {"preset": a.preset, "adapters": a.adapters, "rank": a.rank, "requests": a.requests,
                     "clients": a.clients, "threads_per_replica": a.threads,
                     "max_ongoing_requests": a.max_ongoing_requests},
        "tokens_per_s": rounds, "ratio_two_over_one": [round(x, 3) for x in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "adapter_loads_per_replica": loads, "spilled": spilled,
    }, indent=1))  # fmt: skip
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
