"""Suite `ranks`: what LoRA costs per forward at each rank and adapter count, beside its FLOP ceiling.

In process, on the preset's model (no servers): one decode step of `rank_rows` rows (each row
a one-token sequence, as in decode; attention over one token is negligible), the rows spread
evenly over N adapters with LoRA on `targets` (q, k, v, o by default). Per (N, ranks), side by
side in interleaved rounds (ratios taken within a round, medians reported):

- base: every row on the base model;
- mixed: the rows on their adapters, loramux's LoRA path (`--rank-path`, default auto);
- peft: PEFT's mixed-batch forward (`adapter_names`) with the same weights;
- separate (the mix only): each rank's rows in a forward of their own, summed;
- read: one plain sum over the adapter weights the mixed forward's LoRA path reads.

FLOP ceiling = base MACs ÷ (base + LoRA MACs) per row: what mixed ÷ base throughput can
reach if LoRA cost only its arithmetic. Beside it, the adapters' weights a forward reads ÷ the
base model's (every adapter's A and B once): where that is large and each adapter has few rows,
the LoRA work is bound by memory traffic, not by FLOPs, and the FLOP ceiling is out of reach.
That bound is measured too: "read" times one plain sum over every adapter weight the LoRA path
reads (the members of its stacks, padding to the bucket's rank included), beside the forwards,
and the read ceiling base ÷ (base + read) is what mixed ÷ base would be if LoRA cost nothing but
that one read.
The first round also checks that loramux's logits equal PEFT's (the figures compare the same computation).

Each timing is taken twice: wall time, and the CPU time of this thread. With one torch
thread (`--threads 1`) every op runs on the calling thread, so its CPU time is the work
itself and does not count the time slices other processes take on a shared machine; the
CPU-time ratio is then the steadier one (it still moves with cache and memory contention).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import torch

from loramux.adapters.kinds import lora_batched
from loramux.adapters.model.wrapped import WrappedModel
from loramux.bench.options import BenchOptions
from loramux.bench.synthetic import PRESETS
from loramux.engine.forward_context import BASE_SLOT, AdapterContext
from loramux.engine.step_cost import forward_macs
from loramux.model import build_from_config, tiny_llama_config

log = logging.getLogger("loramux.bench")
MIX = (8, 16, 32, 64, 128)  # the "mix" configuration cycles its adapters through these ranks


def _ranks(label: str, n: int) -> list[int]:
    return [MIX[i % len(MIX)] for i in range(n)] if label == "mix" else [int(label)] * n


class RankBench:
    def __init__(self, opts: BenchOptions) -> None:
        overrides, device, dtype = PRESETS[opts.preset]
        self.opts = opts
        self.device = torch.device(opts.device if opts.device not in (None, "auto") else device)
        self.dtype = getattr(torch, opts.dtype if opts.dtype not in (None, "auto") else dtype)
        self.cfg = tiny_llama_config(**overrides)
        self.rows = opts.rank_rows

    def _model(self) -> torch.nn.Module:
        return build_from_config(self.cfg, seed=self.opts.seed).to(self.device, self.dtype).eval()

    def _weights(self, model: torch.nn.Module, ranks: list[int]) -> dict[str, list[tuple]]:
        """module name -> per adapter (A [r, in], B [out, r]), deterministic."""
        gen = torch.Generator().manual_seed(self.opts.seed + 1)
        out: dict[str, list[tuple]] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in self.opts.targets:
                out[name] = [
                    (torch.randn(r, mod.in_features, generator=gen) / mod.in_features**0.5,
                     torch.randn(mod.out_features, r, generator=gen) * 0.02)
                    for r in ranks
                ]  # fmt: skip
        return out

    def run(self) -> dict:
        rounds = self.opts.rounds
        results = []
        for n in self.opts.rank_adapters:
            labels = [*map(str, self.opts.rank_sweep), *(["mix"] if n >= len(MIX) else [])]  # a mix needs 5
            for label in labels:
                results.append(self._one(n, label, rounds))
                r = results[-1]
                log.info("ranks n=%d r=%s: mixed/base %.2f (ceiling %.2f), mixed/peft %.2f", n, label,
                         r["mixed_over_base"], r["ceiling"], r["mixed_over_peft"] or float("nan"))  # fmt: skip
        return {"title": "LoRA cost by rank and adapter count (decode step, in process)", "rows": self.rows,
                "targets": list(self.opts.targets), "path": self.opts.rank_path, "rounds": rounds,
                "results": results}  # fmt: skip

    @torch.inference_mode()
    def _one(self, n: int, label: str, rounds: int) -> dict:
        from peft import LoraConfig, get_peft_model

        ranks = _ranks(label, n)
        base_model = self._model()
        weights = self._weights(base_model, ranks)
        wrapped = WrappedModel(base_model, num_slots=n)
        for name, per in weights.items():
            for slot, (a, b) in enumerate(per):
                wrapped.linears[name].set_lora(slot, a.to(self.device, self.dtype), b.to(self.device, self.dtype))
        peft_model = None
        if self.opts.peft_loop:
            peft_model = get_peft_model(self._model(), LoraConfig(r=ranks[0], lora_alpha=ranks[0],
                                        target_modules=list(self.opts.targets)), adapter_name="a0")  # fmt: skip
            for i in range(1, n):
                peft_model.add_adapter(f"a{i}", LoraConfig(r=ranks[i], lora_alpha=ranks[i],
                                                           target_modules=list(self.opts.targets)))  # fmt: skip
            mods = dict(peft_model.base_model.model.named_modules())
            for name, per in weights.items():
                mod = mods[name]
                for i, (a, b) in enumerate(per):
                    mod.lora_A[f"a{i}"].weight.copy_(a)
                    mod.lora_B[f"a{i}"].weight.copy_(b)
            peft_model.eval()
        row_slots = [i * n // self.rows for i in range(self.rows)]  # rows grouped by slot, even spread
        ids = torch.randint(3, 259, (1, self.rows), generator=torch.Generator().manual_seed(2), device="cpu")
        ids = ids.to(self.device)
        mask = torch.eye(self.rows, dtype=torch.bool, device=self.device)[None, None]
        pos = torch.zeros(1, self.rows, dtype=torch.long, device=self.device)

        def lora_fwd(slots: list[int]) -> Callable[[], torch.Tensor]:
            def f() -> torch.Tensor:
                m = len(slots)
                wrapped.holder.set(AdapterContext.from_row_slots(slots, self.device))
                try:
                    with lora_batched.force(self.opts.rank_path):
                        return wrapped.model(input_ids=ids[:, :m], attention_mask=mask[:, :, :m, :m],
                                             position_ids=pos[:, :m]).logits  # fmt: skip
                finally:
                    wrapped.holder.set(None)

            return f

        names = [f"a{s}" for s in row_slots]

        def peft_fwd() -> torch.Tensor:
            return peft_model(input_ids=ids.view(-1, 1), adapter_names=names).logits  # [rows, 1, vocab]

        variants: dict[str, Callable[[], object]] = {"base": lora_fwd([BASE_SLOT] * self.rows),
                                                     "mixed": lora_fwd(row_slots)}  # fmt: skip
        if peft_model is not None:
            variants["peft"] = peft_fwd
            got, want = variants["mixed"]()[0], peft_fwd()[:, 0]
            err = float((got - want).abs().max())
            if err > 1e-3:
                raise RuntimeError(f"loramux and PEFT disagree by {err:.2e} at n={n}, ranks {label}")
        # what reading the adapters' weights costs alone: every member's A and B in the stacks the LoRA path
        # reads, summed (a plain reduction reads memory about as fast as this machine can)
        members = [(bk.a[: len(bk.order)], bk.b[: len(bk.order)]) for lin in wrapped.linears.values()
                   for bk in lin.stacked.buckets.values()]  # fmt: skip

        def read() -> object:
            return sum(a.sum() + b.sum() for a, b in members)  # a 0-d tensor: no sync per tensor (`_time` syncs)

        variants["read"] = read
        separate: list[Callable[[], object]] = []
        if label == "mix":
            for r in sorted(set(ranks)):
                separate.append(lora_fwd([s for s in row_slots if ranks[s] == r]))
        keys = [*variants, *(["separate"] if separate else [])]
        times: dict[str, list[float]] = {k: [] for k in keys}  # wall seconds per forward, per round
        cpu: dict[str, list[float]] = {k: [] for k in keys}  # this thread's CPU seconds per forward
        reps = self.opts.rank_reps
        for k in range(rounds):
            order = list(variants.items())
            order = order[k % len(order) :] + order[: k % len(order)]
            for name, fn in order:
                wall, used = _time(fn, reps, self.device)
                times[name].append(wall)
                cpu[name].append(used)
            if separate:
                each = [_time(fn, reps, self.device) for fn in separate]
                times["separate"].append(sum(w for w, _ in each))
                cpu["separate"].append(sum(c for _, c in each))
        lora_macs = sum(r * (a.shape[1] + b.shape[0]) for per in weights.values() for (a, b), r in zip(per, ranks))
        base_macs = forward_macs(base_model)  # every product of a row, the LM head included
        out = {
            "adapters": n, "ranks": label, "ceiling": base_macs / (base_macs + lora_macs / n),
            # weights a forward reads: every adapter's A and B once, against the base's (one element per MAC)
            "bytes_over_base": lora_macs / base_macs,
            **_summary(times),
            "cpu": _summary(cpu),
        }  # fmt: skip
        return out


def _time(fn: Callable[[], object], reps: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) per call of `fn`, over `reps` calls after a warm one; on
    CUDA the clocks stop once the device has finished the calls' work, not when they were queued."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm: plans, caches
    sync()
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps, (time.thread_time() - c0) / reps


def _summary(times: dict[str, list[float]]) -> dict:
    """One clock's ratios (medians of per-round ratios) and median milliseconds per configuration."""
    return {
        "mixed_over_base": _median_ratio(times["base"], times["mixed"]),
        "mixed_over_peft": _median_ratio(times["peft"], times["mixed"]) if "peft" in times else None,
        # mixed ÷ base if LoRA cost only one read of its weights: base ÷ (base + read), per round
        "read_ceiling": statistics.median(b / (b + r) for b, r in zip(times["base"], times["read"])),
        "separate_over_mix": _median_ratio(times["separate"], times["mixed"]) if "separate" in times else None,
        "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
    }


def _median_ratio(num_times: list[float], den_times: list[float]) -> float:
    """Throughput of `den` relative to `num`: per round num_time / den_time, median over rounds."""
    return statistics.median(a / b for a, b in zip(num_times, den_times))


def markdown(res: dict) -> list[str]:
    lines = [f"## ranks: {res['title']}", "",
             f"{res['rows']} decode rows over N adapters, LoRA on {', '.join(res['targets'])}, path "
             f"`{res['path']}`; {res['rounds']} interleaved rounds, medians of per-round ratios. "
             "mixed ÷ base and ÷ PEFT are throughput ratios; the FLOP ceiling is base MACs ÷ (base + LoRA MACs); "
             "the read ceiling is base ÷ (base + read), read being one plain sum over every adapter weight the "
             "LoRA path reads (its stacks), timed beside the forwards: what mixed ÷ base would be if LoRA cost "
             "only reading its weights once; \"of the lower\" is mixed ÷ base over the lower of the two. "
             "The first table times wall clock, the second this thread's CPU time (steadier with one torch "
             "thread on a shared machine).", ""]  # fmt: skip
    for clock in ("wall", "cpu"):
        lines += [f"{'Wall time' if clock == 'wall' else 'CPU time of the timing thread'}:", "",
                  "| adapters | ranks | mixed ÷ base | FLOP ceiling | of ceiling | adapter ÷ base bytes | read ceiling"
                  " | of the lower | mixed ÷ PEFT | separate ÷ mix | base / mixed / PEFT / read (ms) |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
        for r in res["results"]:
            t = r if clock == "wall" else r.get("cpu")
            if t is None:  # a result written before CPU times were taken
                continue
            ms = t["ms"]
            peft = "-" if t["mixed_over_peft"] is None else f"{t['mixed_over_peft']:.2f}"
            sep = "-" if t["separate_over_mix"] is None else f"{t['separate_over_mix']:.2f}"
            byt = f"{r['bytes_over_base']:.2f}" if "bytes_over_base" in r else "-"
            read = t.get("read_ceiling")  # None in a result written before the read was timed
            lower = None if read is None else min(read, r["ceiling"])
            rd = "- | -" if lower is None else f"{read:.2f} | {t['mixed_over_base'] / lower:.2f}"
            lines.append(f"| {r['adapters']} | {r['ranks']} | {t['mixed_over_base']:.2f} | {r['ceiling']:.2f} | "
                         f"{t['mixed_over_base'] / r['ceiling']:.2f} | {byt} | {rd} | {peft} | {sep} | "
                         f"{ms['base']:.1f} / {ms['mixed']:.1f} / {ms.get('peft', float('nan')):.1f} / "
                         f"{ms.get('read', float('nan')):.2f} |")  # fmt: skip
        lines.append("")
    return lines
