"""What decodes and prompt chunks cost a step, by their context: the measurements behind engine/step_cost.py.

Builds the bench's synthetic model (`--preset cpu`, its context raised to 4096) and runs
the engine's runner on hand-made batches (no scheduler: the block tables are allocated
here, the K/V are whatever the pool holds): N decodes of sequences of L positions alone,
and N decodes of `--decode-len` positions with one prompt chunk of n tokens after c
computed positions. All batches take turns, repetition by repetition (drift on a shared
machine hits them alike); medians of this thread's CPU time (with one torch thread the
forward runs on it), which time slices lost to other processes do not inflate. Fits

    t = t0 + a·(tokens) + b·(keys the tokens see) + g·(positions gathered)

(per sequence of n new tokens after c positions: n tokens, n·c + n(n+1)/2 keys, c + n
positions gathered) and prints the fitted K = a / b and G = a / g beside the shape's
P / (2·H·d) and P / (2·H_kv·d), i.e. the device factors of step_cost.py. Then checks the
engine's own cost model: the chunks it gives for `--max-batch-tokens` at each context,
whose steps should cost the same.

    PYTHONPATH=server .venv/bin/python scripts/profile_chunk_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from profile_chunked import long_context_model  # noqa: E402

from loramux.adapters.model.wrapped import WrappedModel  # noqa: E402
from loramux.config import EngineConfig  # noqa: E402
from loramux.engine.engine import Engine  # noqa: E402
from loramux.engine.request import Request, SamplingParams  # noqa: E402
from loramux.engine.runner import Batch  # noqa: E402
from loramux.engine.step_cost import shape_of  # noqa: E402
from loramux.model import load_base_model  # noqa: E402


def request(engine: Engine, rid: str, computed: int, n: int, output: bool) -> Request:
    r = Request(rid, [3 + i % 250 for i in range(computed + n - output)], SamplingParams(max_new_tokens=1))
    r.output_ids = [7] if output else []
    r.num_computed, r.num_scheduled = computed, n
    r.block_table = [engine.pool.allocate() for _ in range(engine.pool.blocks_for(computed + n))]
    return r


def features(chunk: Request) -> tuple[float, float, float]:
    """(tokens, keys they see, context positions gathered) of a prompt chunk."""
    c, n = chunk.num_computed, chunk.num_scheduled
    return (n, n * c + n * (n + 1) / 2, c)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--decodes", type=int, default=16)
    p.add_argument("--decode-len", type=int, default=64, help="L of the decodes beside the chunks")
    p.add_argument("--decode-lens", default="64,192,320", help="L of the decodes alone")
    p.add_argument("--chunks", default="16,48", help="the fixed chunk sizes")
    p.add_argument("--budget", type=int, default=64, help="--max-batch-tokens for the cost model's chunks")
    p.add_argument("--contexts", default="0,512,1024,1536,2048")
    p.add_argument("--reps", type=int, default=11)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base_model(str(long_context_model(Path(tmp))), device="cpu", dtype="float32")
        engine = Engine(base, WrappedModel(base.model, num_slots=1), EngineConfig(max_model_len=4096))
        cost = engine.scheduler.cost

        def decodes(length: int) -> list[Request]:
            return [request(engine, f"d{length}-{i}", length - 1, 1, True) for i in range(a.decodes)]

        beside = decodes(a.decode_len)
        alone = {f"{a.decodes} decodes of L={n}": Batch([], decodes(n)) for n in map(int, a.decode_lens.split(","))}
        alone["decodes alone"] = Batch([], beside)
        fit: dict[str, Batch] = {}
        check: dict[str, Batch] = {}
        left = a.budget - len(beside)
        for c in map(int, a.contexts.split(",")):
            for n in map(int, a.chunks.split(",")):
                fit[f"decodes + chunk c={c:4d} n={n:3d}"] = Batch([request(engine, f"p{c}-{n}", c, n, False)], beside)
            n = max(cost.tokens_within(c, left), engine.pool.block_size)
            check[f"decodes + chunk c={c:4d} n={n:3d} (model)"] = Batch([request(engine, f"m{c}", c, n, False)], beside)
        batches = {**alone, **fit, **check}
        times: dict[str, list[float]] = {k: [] for k in batches}
        for rep in range(a.reps + 2):
            for name, batch in batches.items():
                t0 = time.thread_time()
                engine.runner.run(batch)
                if rep >= 2:  # two warm-up repetitions
                    times[name].append(time.thread_time() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        base_t = med["decodes alone"]
        # a chunk's time over the decodes alone = a·n + b·keys + g·context (least squares over the fixed chunks)
        x = torch.tensor([features(b.prefill[0]) for b in fit.values()], dtype=torch.float64)
        y = torch.tensor([[med[k] - base_t] for k in fit], dtype=torch.float64)
        ta, tb, tg = torch.linalg.lstsq(x, y).solution[:, 0].tolist()
        print(f"--threads {a.threads}; CPU ms per step (median of {a.reps} runs); a chunk's: the fit's, its cost")
        for k, b in batches.items():
            line = f"  {k:44s} {1e3 * med[k]:7.2f} ms"
            if b.prefill:
                f = features(b.prefill[0])
                line += f"  chunk {1e3 * (med[k] - base_t):6.2f} fit {1e3 * (ta * f[0] + tb * f[1] + tg * f[2]):6.2f}"
                line += f"  cost {cost.chunk(b.prefill[0].num_computed, b.prefill[0].num_scheduled):6.1f}"
            print(line)
        model = [med[k] for k in check]
        print(f"steps with the cost model's chunks, max / min over contexts: {max(model) / min(model):.2f}")
        weights, heads, kv_heads, d = shape_of(base.model)
        k_shape, g_shape = weights / (2 * heads * d), weights / (2 * kv_heads * d)
        print(
            f"fit: a {1e3 * ta:.3f} ms per token, b {1e6 * tb:.4f} us per key, g {1e6 * tg:.3f} us per context position"
        )
        k, g = ta / tb, ta / tg
        print(f"K = a/b = {k:.0f} (shape P/(2·H·d) = {k_shape:.0f}: attention factor α = {k_shape / k:.2f}); "
              f"G = a/g = {g:.1f} (shape P/(2·H_kv·d) = {g_shape:.0f}: gather factor γ = {g_shape / g:.0f}); "
              f"the engine's K = {cost.keys_per_token:.0f}, G = {cost.positions_per_token:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
