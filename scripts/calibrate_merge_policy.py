"""The merge policy's cost model against measured steps: for each batch shape, the mode it picks and the fastest.

    PYTHONPATH=server python scripts/calibrate_merge_policy.py [--threads 1] [--rank 16] [--no-compile]
    PYTHONPATH=server python scripts/calibrate_merge_policy.py --preset gpu-1b --no-compile   # on CUDA

Model: one of the bench's synthetic Llamas (`--preset cpu`: hidden 512, 4 layers, float32 on the CPU;
`gpu-1b`: about 1B parameters, bfloat16 on CUDA), 16 LoRA adapters of `--rank` on q, k, v, o, the one
in slot 0 merged by hand (what the merged cache does once it is hot).
An engine in this process, its decode graphs compiled as a server compiles them (`--no-compile`: eager),
with 64 requests decoding on the merged adapter and 64 on the 15 others. For batches of B rows of
which a share is on the merged adapter, one decode step is timed in each of the three modes of
`merge_policy.choose_mode`, in interleaved rounds (median of rounds, so drift hits all three alike):

- unmerged: W0 for every row, each row's delta added (the merged adapter's rows join the batched spans);
- merged: the merged weights for every row, the other rows undo its delta and add their own (dLoRA);
- split: the merged rows in a forward of their own on the merged weights, the others in a second one.

It prints, per shape, the three times, the fastest, the model's pick and the pick's time over the
fastest (the regret). It also fits one forward's time over base-only batches as t(B) = a + b·B: a / b is
a forward's fixed cost in rows (`merge_policy.FORWARD_ROWS`, the split's price).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_lora_kernels import install_loras  # this script's folder is on sys.path

from loramux.adapters.cache import merge_policy
from loramux.adapters.cache.merge_policy import BatchShape, Mode, choose_mode
from loramux.adapters.cache.merged_weights import merge_all, merge_cost
from loramux.adapters.model.wrapped import WrappedModel
from loramux.bench.synthetic import PRESETS, write_synthetic_model
from loramux.config import EngineConfig
from loramux.engine.engine import Engine
from loramux.engine.request import Request, SamplingParams
from loramux.engine.runner import Batch
from loramux.engine.step_cost import forward_macs
from loramux.model import load_base_model

ADAPTERS = 16
PER_GROUP = 64  # requests on the merged adapter, on the others, and on the base model


def decoding(
    model_dir: Path, preset: str, rank: int, compile: bool
) -> tuple[Engine, list[Request], list[Request], list[Request]]:
    """An engine with slot 0 merged and 3·PER_GROUP requests decoding: (engine, on slot 0, on the others, base)."""
    _, device, dtype = PRESETS[preset]
    base = load_base_model(str(model_dir), device=device, dtype=dtype)
    config = EngineConfig(max_running=3 * PER_GROUP, max_model_len=256, compile=compile, merged_cache_mb=64)
    wrapped = WrappedModel(base.model, num_slots=ADAPTERS)
    install_loras(wrapped, ADAPTERS, rank)  # on q, k, v, o
    layers = {n: lay for n, lay in wrapped.linears.items() if lay.deltas[0] is not None}
    snapshot = [(n, lay.parts(0), lay.base_weight_rows(), lay.bias) for n, lay in layers.items()]
    for name, merged in merge_all(snapshot, wrapped.dtype).items():
        layers[name].set_merged(0, merged)
    engine = Engine(base, wrapped, config)
    engine.compile()
    reqs = []
    for i in range(3 * PER_GROUP):
        p = SamplingParams(max_new_tokens=64, ignore_eos=True)
        r = Request(f"r{i}", [3 + (i * 7 + j) % 250 for j in range(16 + i % 17)], p)
        r.adapter_slot = 0 if i < PER_GROUP else 1 + i % (ADAPTERS - 1) if i < 2 * PER_GROUP else -1
        engine.validate(r)
        engine.submit(r)
        reqs.append(r)
    with engine._cv:
        engine.scheduler.waiting.extend(engine._inbox)
        engine._inbox.clear()
    while not all(r.output_ids for r in reqs):  # the prefills; each request then holds its first token
        engine.step()
    for r in reqs:
        engine.runner.schedule_rest(r)  # its next position: run (not committed) as often as timed
    return engine, reqs[:PER_GROUP], reqs[PER_GROUP : 2 * PER_GROUP], reqs[2 * PER_GROUP :]


def batches(hot: list[Request], others: list[Request], m: int, o: int) -> dict[Mode, Batch]:
    decode = hot[:m] + others[:o]
    return {
        Mode.UNMERGED: Batch(prefill=[], decode=decode),
        Mode.MERGED: Batch(prefill=[], decode=decode, merged_slot=0),
        Mode.SPLIT: Batch(prefill=[], decode=decode, merged_slot=0, split_merged=True),
    }


def timed(engine: Engine, runs: dict, rounds: int, reps: int) -> dict:
    """Median over rounds of each run's ms per forward, the runs taking turns within a round."""
    times: dict = {k: [] for k in runs}
    sync = torch.cuda.synchronize if engine.runner.device.type == "cuda" else lambda: None
    for b in runs.values():  # warm (and make sure every compiled graph it needs is there)
        engine.runner.run(b)
    for _ in range(rounds):
        for k, b in runs.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                engine.runner.run(b)
            sync()
            times[k].append(1e3 * (time.perf_counter() - t0) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rows", default="2,4,8,16,32,64")
    p.add_argument("--shares", default="0.25,0.5,0.75,0.9")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_synthetic_model(a.preset, Path(tmp) / "model")
        engine, hot, others, plain = decoding(model_dir, a.preset, a.rank, not a.no_compile)
        device = engine.runner.device.type
        wrapped = engine.runner.wrapped
        cost = merge_cost([lay for lay in wrapped.linears.values() if lay.deltas[0] is not None], 0)
        fwd = forward_macs(engine.runner.model)
        rows = [int(x) for x in a.rows.split(",")]
        # one forward's fixed cost: base-only batches of B rows
        base = timed(engine, {b: Batch(prefill=[], decode=plain[:b]) for b in [1, *rows]}, a.rounds, a.reps)
        b_fit, a_fit = _line(list(base), list(base.values()))
        print(f"base forward: t(B) = {a_fit:.2f} ms + {b_fit:.3f} ms·B  ->  fixed cost {a_fit / b_fit:.1f} rows")
        print(" ".join(f"B={b}: {t:.2f} ms" for b, t in base.items()))
        print(f"\nrank {a.rank}; ms per step (median of {a.rounds} rounds); regret = pick / fastest")
        head = ("B", "merged", "others", "unmerged", "merged", "split")
        print(" ".join(f"{h:>{w}}" for h, w in zip(head, (3, 6, 6, 9, 8, 8))) + "  fastest  pick      regret")
        regrets = []
        for b in rows:
            for share in [float(x) for x in a.shares.split(",")]:
                m = round(share * b)
                o = b - m
                if m == 0 or o == 0:
                    continue
                t = timed(engine, batches(hot, others, m, o), a.rounds, a.reps)
                best = min(t, key=t.__getitem__)
                pick = choose_mode(BatchShape(m, o, 1, joins_batched=True), cost, fwd, device)
                regrets.append(t[pick] / t[best])
                print(
                    f"{b:3d} {m:6d} {o:6d} {t[Mode.UNMERGED]:9.2f} {t[Mode.MERGED]:8.2f} {t[Mode.SPLIT]:8.2f}  "
                    f"{best.value:8s} {pick.value:8s}  {regrets[-1]:.3f}"
                )
        c = engine.runner.compiled
        if c is not None:
            print(f"compiled steps {c.steps}, eager (no graph fits) {c.misses}, compile error: {c.report.error!r}")
        print(f"\nregret: median {statistics.median(regrets):.3f}, worst {max(regrets):.3f} over {len(regrets)} shapes")
        rows_now = merge_policy.FORWARD_ROWS.get(device, merge_policy.FORWARD_ROWS["cuda"])
        print(f"(model on {device}: OP_MACS {merge_policy.OP_MACS.get(device, 0):.3g}, FORWARD_ROWS {rows_now})")


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


if __name__ == "__main__":
    main()
