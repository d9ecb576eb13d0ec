"""Where the engine's time goes: torch.profiler on loramux's engine thread, base-only vs mixed adapters.

Uses a model directory and store that `loramux bench --workdir DIR` left behind (the
synthetic model and its adapters), starts a server in this process, and profiles the
engine thread (where the model runs) during one run of the bench's workload:

    PYTHONPATH=server .venv/bin/python scripts/profile_engine.py DIR [--threads 1] [--adapters 16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from loramux.bench.client import run_requests
from loramux.bench.target import LoramuxTarget, ServerSettings
from loramux.bench.workload import WorkloadSpec, make_requests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path, help="a `loramux bench --workdir` directory (model/, store/)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--adapters", type=int, default=16, help="mix-00 .. mix-NN from the bench's store")
    p.add_argument("--rows", type=int, default=16, help="rows of each profile table")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    settings = ServerSettings(model=str(a.workdir / "model"), store=a.workdir / "store", device="cpu", dtype="float32")
    target = LoramuxTarget("profile", settings, spawn="thread")
    target.start()
    try:
        engine = target._thread_server.engine
        mix = [f"mix-{i:02d}" for i in range(a.adapters)]
        for name, spec in (("base", WorkloadSpec()), ("mixed", WorkloadSpec(adapters=mix))):
            reqs = make_requests(spec)
            run_requests(target.address, name, reqs, spec.clients)  # warm: adapters into their slots
            prof = profile(activities=[ProfilerActivity.CPU])
            # The model runs on the engine thread, and the profiler records the thread it starts on.
            engine.call(prof.__enter__).result()
            res = run_requests(target.address, name, reqs, spec.clients)
            engine.call(lambda prof=prof: prof.__exit__(None, None, None)).result()
            print(f"== {name}: {res.tokens} tokens in {res.wall_s:.2f}s ({res.throughput:.0f} tok/s)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=44))
    finally:
        target.stop()


if __name__ == "__main__":
    main()
