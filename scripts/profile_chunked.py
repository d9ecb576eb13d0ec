"""The chunked suite's window, in process: which engine steps are slow while long prompts arrive.

Builds the bench's synthetic model (`--preset cpu`, its context raised to 4096) in a
temporary directory and runs an `Engine` in this process (no server, no gRPC): N streams
decode; once each has a token, long prompts are submitted one at a time (the next once
the previous has its token and every stream has decoded 4 more), as the bench's chunked
suite does. Every step is timed, in parts (schedule, forward) and by what it carried
(decodes only, a first chunk, a chunk by its context), in wall time and in this thread's
CPU time (with one torch thread the step runs on it; time slices lost to other processes
on a shared machine do not count). Prints, per budget policy (`cost`: the engine's cost
model, engine/step_cost.py; `tokens`: plain token counts, the policy before it), the
streams' per-token gaps p50 / p99 over the window and the long prompts' TTFT in both
clocks, then the step classes by cost:

    PYTHONPATH=server .venv/bin/python scripts/profile_chunked.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loramux.adapters.model.wrapped import WrappedModel
from loramux.bench.synthetic import write_synthetic_model
from loramux.config import EngineConfig
from loramux.engine.engine import Engine
from loramux.engine.request import Request, SamplingParams
from loramux.engine.step_cost import StepCost
from loramux.model import load_base_model


def long_context_model(tmp: Path) -> Path:
    d = write_synthetic_model("cpu", tmp / "model")
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (d / "config.json").write_text(json.dumps(cfg))
    return d


class Timed:
    """Wraps the engine's schedule and forward calls to time them, step by step."""

    def __init__(self, engine: Engine) -> None:
        self.parts: dict[str, float] = {}
        self.batch = None
        sched, run = engine.scheduler.schedule, engine.runner.run

        def schedule(on_error):  # noqa: ANN001, ANN202
            t0 = time.perf_counter()
            b = sched(on_error)
            self.parts["schedule"] = time.perf_counter() - t0
            self.batch = [(r.num_computed, r.num_scheduled, len(r.output_ids)) for r in b.requests]
            return b

        def forward(batch):  # noqa: ANN001, ANN202
            t0 = time.perf_counter()
            out = run(batch)
            self.parts["forward"] = time.perf_counter() - t0
            return out

        engine.scheduler.schedule, engine.runner.run = schedule, forward


def classify(batch: list[tuple[int, int, int]]) -> str:
    """decode / chunk@<context bucket> / first chunk / several prompts."""
    chunks = [(c, n) for c, n, out in batch if not (n == 1 and out)]
    if not chunks:
        return "decode only"
    if len(chunks) > 1:
        return f"{len(chunks)} prompt chunks"
    c, n = chunks[0]
    if c == 0:
        return "first chunk"
    return f"chunk, context {c // 500 * 500:4d}-{c // 500 * 500 + 499}"


def run(a: argparse.Namespace, model_dir: Path, policy: str) -> None:
    base = load_base_model(str(model_dir), device="cpu", dtype="float32")
    cfg = EngineConfig(max_running=a.streams + 4, max_model_len=4096, max_batch_tokens=a.max_batch_tokens,
                       prefix_caching=False)  # fmt: skip
    engine = Engine(base, WrappedModel(base.model, num_slots=1), cfg)
    if policy == "tokens":  # plain token counts: every token costs 1, whatever its context
        engine.scheduler.cost = StepCost()
    elif policy == "keys":  # the cost model without its gather term
        engine.scheduler.cost = StepCost(engine.scheduler.cost.keys_per_token)
    timed = Timed(engine)
    rng = random.Random(16)
    clock = {"wall": 0.0, "cpu": 0.0}  # the sum of the step times so far, in each clock
    times: dict[str, list[dict[str, float]]] = {}
    pending: list[str] = []

    def submit(rid: str, prompt: list[int], n: int) -> Request:
        r = Request(rid, prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
        r.sink = lambda ev, rid=rid: pending.append(rid)  # stamped at the end of the step that made the token
        engine.validate(r)
        engine.submit(r)
        return r

    def step() -> dict:
        with engine._cv:
            engine.scheduler.waiting.extend(engine._inbox)
            engine._inbox.clear()
        t0, c0 = time.perf_counter(), time.thread_time()
        engine.step()
        s = {"total": time.perf_counter() - t0, "cpu": time.thread_time() - c0, "batch": timed.batch, **timed.parts}
        clock["wall"] += s["total"]
        clock["cpu"] += s["cpu"]
        for rid in pending:
            times.setdefault(rid, []).append(dict(clock))
        pending.clear()
        return s

    streams = [submit(f"s{i}", [rng.randrange(3, 250) for _ in range(32)], a.stream_output) for i in range(a.streams)]
    while not all(r.output_ids for r in streams):
        step()
    for _ in range(8):  # warm
        step()
    log: list[dict] = []
    window = [dict(clock)]
    submitted: list[dict[str, float]] = []
    for j in range(a.prompts):
        submitted.append(dict(clock))
        long = submit(f"long{j}", [rng.randrange(3, 250) for _ in range(a.prompt_len)], 1)
        while not long.output_ids:
            log.append(step())
        marks = [len(r.output_ids) + 4 for r in streams]
        while any(len(r.output_ids) < m for r, m in zip(streams, marks)):
            log.append(step())
    window.append(dict(clock))
    print(f"policy {policy}: --max-batch-tokens {engine.batch_tokens}, {len(log)} steps in the window")
    for c in ("wall", "cpu"):
        ts = [[t[c] for t in times[f"s{i}"]] for i in range(a.streams)]
        gaps = sorted(y - x for t in ts for x, y in zip(t, t[1:]) if y >= window[0][c] and x <= window[1][c])
        p50, p99 = statistics.median(gaps), gaps[int(0.99 * (len(gaps) - 1))]
        ttft = statistics.median(times[f"long{j}"][0][c] - submitted[j][c] for j in range(a.prompts))
        print(f"  {c:4s} clock: stream gaps p50 {1e3 * p50:6.1f} ms p99 {1e3 * p99:6.1f} ms: p99 / p50 {p99 / p50:.2f}"
              f" (max {1e3 * gaps[-1]:.1f} ms); long-prompt TTFT p50 {ttft:.2f} s")  # fmt: skip
    classes: dict[str, list[dict]] = {}
    for s in log:
        classes.setdefault(classify(s["batch"]), []).append(s)
    print(
        f"  {'step class (medians)':32s} {'n':>4s} {'cpu ms':>7s} {'wall ms':>8s} {'max':>7s} {'sched':>6s} {'fwd':>7s}"
    )
    for name, ss in sorted(classes.items(), key=lambda kv: statistics.median(x["cpu"] for x in kv[1])):
        med = {k: 1e3 * statistics.median(x.get(k, 0.0) for x in ss) for k in ("cpu", "total", "schedule", "forward")}
        mx = 1e3 * max(x["total"] for x in ss)
        print(f"  {name:32s} {len(ss):4d} {med['cpu']:7.2f} {med['total']:8.2f} {mx:7.2f} {med['schedule']:6.2f} "
              f"{med['forward']:7.2f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch-tokens", type=int, default=0)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--stream-output", type=int, default=400)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=2000)
    p.add_argument(
        "--policies",
        default="cost,tokens",
        help="cost: the engine's cost model; keys: without its gather term; tokens: plain counts",
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = long_context_model(Path(tmp))
        for policy in a.policies.split(","):
            run(a, model_dir, policy)


if __name__ == "__main__":
    main()
