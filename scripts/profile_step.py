"""One engine decode step, taken apart: the model's forward vs. everything around it (batch tensors, sampling).

Builds the bench's synthetic model (`--preset cpu`: Llama, hidden 512, 4 layers, byte
vocabulary) in a temporary directory, runs an `Engine` in this process (no server), puts
N requests into the decode phase and times `engine.step()` over many steps, with the
model's own forward timed by a forward hook (and around the compiled forward, `--compile`).
With `--adapters N` the engines are the base model and rows spread over N LoRA adapters
(rank 16 on q, k, v, o), each eager and (`--compile`) compiled. Prints, per row count and mode, the
milliseconds per step, of them in the forward, and the share outside it. All modes of a
row count take turns step by step, so drift on a shared machine hits them alike:

    PYTHONPATH=server .venv/bin/python scripts/profile_step.py --threads 2 --rows 1,64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_lora_kernels import install_loras  # this script's folder is on sys.path

from loramux.adapters.model.wrapped import WrappedModel
from loramux.bench.synthetic import write_synthetic_model
from loramux.config import EngineConfig
from loramux.engine.engine import Engine
from loramux.engine.request import Request, SamplingParams
from loramux.model import load_base_model

SAMPLED = {"temperature": 0.8, "top_p": 0.9, "top_k": 50}
PENALTIES = {"repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5}
# (fields a SamplingParams lacks are left out, so that the script also runs on older code)
MODES = {
    name: SamplingParams(**{k: v for k, v in kw.items() if k in SamplingParams.__dataclass_fields__})
    for name, kw in (("greedy", {}), ("sampled", SAMPLED), ("penalties", {**SAMPLED, **PENALTIES}))
}


class ForwardClock:
    """Seconds spent inside the model's forward (a hook pair on the top module, and around the compiled forward)."""

    def __init__(self, model: torch.nn.Module, compiled: object | None = None) -> None:
        self.total = 0.0
        self._t0 = 0.0
        model.register_forward_pre_hook(lambda *_: self._start())
        model.register_forward_hook(lambda *_: self._stop())
        if compiled is not None:  # the compiled forward is called directly, without the module's hooks
            fn = compiled.fn

            def timed(**kwargs: object) -> object:
                self._start()
                try:
                    return fn(**kwargs)
                finally:
                    self._stop()

            compiled.fn = timed

    def _start(self) -> None:
        self._t0 = time.perf_counter()

    def _stop(self) -> None:
        self.total += time.perf_counter() - self._t0


def decoding_engine(
    model_dir: Path, rows: int, params: SamplingParams, steps: int, compile: bool = False, adapters: int = 0
) -> Engine:
    """An engine whose `rows` requests are all decoding; with `adapters`, row i on slot i % adapters."""
    base = load_base_model(str(model_dir), device="cpu", dtype="float32")
    config = EngineConfig(max_running=rows, max_model_len=512, compile=compile)
    wrapped = WrappedModel(base.model, num_slots=max(1, adapters))
    install_loras(wrapped, adapters)  # rank 16 on q, k, v, o (scripts/bench_lora_kernels.py)
    engine = Engine(base, wrapped, config)
    engine.compile()  # the decode graphs (a no-op without compile)
    for i in range(rows):
        p = SamplingParams(**{**params.__dict__, "max_new_tokens": steps + 8, "ignore_eos": True})
        r = Request(f"r{i}", [3 + (i * 7 + j) % 250 for j in range(16 + i % 17)], p)
        if adapters:  # installed by hand, without an adapter cache: the slot is the request's adapter
            r.adapter_slot = i % adapters
        engine.validate(r)
        engine.submit(r)
    with engine._cv:
        engine.scheduler.waiting.extend(engine._inbox)
        engine._inbox.clear()
    reqs = list(engine.scheduler.waiting)
    while not all(r.output_ids for r in reqs):  # the prefills (chunked by --max-batch-tokens)
        engine.step()
    return engine  # every later step decodes all rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,64")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--compile", action="store_true", help="also a greedy engine with the compiled decode step")
    p.add_argument(
        "--adapters", type=int, default=0, help="N > 0: base vs rows over N LoRA r16 adapters (q, k, v, o), greedy"
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_synthetic_model("cpu", Path(tmp) / "model")
        for rows in [int(x) for x in a.rows.split(",")]:
            if a.adapters:  # "greedy" (the ratios' denominator) is the base model, eager
                greedy = MODES["greedy"]
                kinds = [(c, n) for c in (False, True)[: 1 + a.compile] for n in (0, a.adapters)]
                engines = {
                    ("greedy" if (c, n) == (False, 0) else f"{'c-' if c else ''}{'mixed' if n else 'base'}"): (
                        decoding_engine(model_dir, rows, greedy, a.steps, compile=c, adapters=n)
                    )
                    for c, n in kinds
                }
            else:
                engines = {m: decoding_engine(model_dir, rows, sp, a.steps) for m, sp in MODES.items()}
            if a.compile and not a.adapters:
                engines["compiled"] = decoding_engine(model_dir, rows, MODES["greedy"], a.steps, compile=True)
            clocks = {m: ForwardClock(e.runner.model, e.runner.compiled) for m, e in engines.items()}
            wall = dict.fromkeys(engines, 0.0)
            for _ in range(a.steps):
                for m, e in engines.items():
                    t0 = time.perf_counter()
                    e.step()
                    wall[m] += time.perf_counter() - t0
            for m in engines:
                step_ms, fwd_ms = 1e3 * wall[m] / a.steps, 1e3 * clocks[m].total / a.steps
                print(
                    f"rows={rows:3d} {m:9s} step {step_ms:7.2f} ms  forward {fwd_ms:7.2f} ms  "
                    f"outside the forward {100 * (1 - fwd_ms / step_ms):5.1f}%  "
                    f"step / greedy step {wall[m] / wall['greedy']:.3f}"
                )


if __name__ == "__main__":
    main()
