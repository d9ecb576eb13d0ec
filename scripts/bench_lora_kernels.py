"""Batched vs per-segment LoRA arithmetic, side by side: one forward of a small Llama over decode-like rows.

    PYTHONPATH=server python scripts/bench_lora_kernels.py [--threads 1 2] [--layers 8] [--rows 64]

Model: Llama, hidden 512, `--layers` layers, float32, LoRA rank 16 on q, k, v, o in every slot.
Each row is a sequence of one token (a decode row without KV context: the adapter arithmetic per
row is the same as in decode). Per thread count and per number of adapters in the batch, the rows
are split over the adapters (equal and unequal segment lengths), and three variants are timed in
interleaved rounds (median of rounds) so that machine noise hits all alike (`--level layers`: only
the adapted projections, without attention / MLP / lm_head, where the LoRA share is easier to see):

- base: every row on the base model (no adapter arithmetic);
- segment: lora_batched.force("segment"), two matmuls per segment per layer (the reference path);
- batched: lora_batched.force("grouped"), spans of the rank-bucketed stacks, one bmm pair per span.

`--calibrate` instead measures the cost model's constants (lora_batched.C_OP, C_COPY): the
fixed cost of one small op and the time of one gathered element, both in units of one
multiply-accumulate of a large matmul, medians over rounds.

Prints ms per forward, base/segment and base/batched (throughput relative to base, higher is better)
and batched/segment (time, lower is better).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loramux.adapters.kinds import lora_batched
from loramux.adapters.model.wrapped import WrappedModel
from loramux.engine.forward_context import BASE_SLOT, AdapterContext
from loramux.model import build_from_config, tiny_llama_config

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK = 16


def build(layers: int, slots: int) -> WrappedModel:
    cfg = tiny_llama_config(hidden_size=512, intermediate_size=1376, num_hidden_layers=layers, num_attention_heads=8,
                            num_key_value_heads=8, max_position_embeddings=2048)  # fmt: skip
    wrapped = WrappedModel(build_from_config(cfg, seed=0), num_slots=slots)
    install_loras(wrapped, slots)
    return wrapped


def install_loras(wrapped: WrappedModel, slots: int, rank: int = RANK) -> None:
    """Seeded random LoRA weights of `rank` on TARGETS in slots 0..slots-1 (their values do not matter here),
    in the model's device and dtype."""
    gen = torch.Generator().manual_seed(1)
    for name, layer in wrapped.linears.items():
        if name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        for slot in range(slots):
            a = torch.randn(rank, layer.in_features, generator=gen) * 0.05
            b = torch.randn(layer.out_features, rank, generator=gen) * 0.05
            layer.set_lora(slot, a.to(wrapped.device, wrapped.dtype), b.to(wrapped.device, wrapped.dtype))


def split_rows(rows: int, nseg: int, unequal: bool) -> list[int]:
    """Row slots grouped by slot: `rows` rows over `nseg` adapters, equal or 1..2·mean rows each."""
    if not unequal:
        sizes = [rows // nseg + (i < rows % nseg) for i in range(nseg)]
    else:
        weights = [1 + (3 * i) % 7 for i in range(nseg)]
        sizes = [max(1, round(rows * w / sum(weights))) for w in weights]
        sizes[-1] += rows - sum(sizes)
        if sizes[-1] < 1:
            raise ValueError("too many segments for the rows")
    return [slot for slot, n in enumerate(sizes) for _ in range(n)]


@torch.inference_mode()
def forward_layers(wrapped: WrappedModel, row_slots: list[int]) -> None:
    """Only the adapted projections (q, k, v, o of every layer) on one input: the LoRA share without the rest."""
    x = torch.randn(1, len(row_slots), 512, generator=torch.Generator().manual_seed(0))
    wrapped.holder.set(AdapterContext.from_row_slots(row_slots, torch.device("cpu")))
    try:
        for name, layer in wrapped.linears.items():
            if name.rsplit(".", 1)[-1] in TARGETS:
                layer(x)
    finally:
        wrapped.holder.set(None)


@torch.inference_mode()
def forward(wrapped: WrappedModel, row_slots: list[int]) -> None:
    n = len(row_slots)
    ids = torch.randint(3, 259, (1, n), generator=torch.Generator().manual_seed(0))
    mask = torch.eye(n, dtype=torch.bool)[None, None]  # every row its own one-token sequence
    wrapped.holder.set(AdapterContext.from_row_slots(row_slots, torch.device("cpu")))
    try:
        wrapped.model(input_ids=ids, attention_mask=mask, position_ids=torch.zeros(1, n, dtype=torch.long))
    finally:
        wrapped.holder.set(None)


def time_variants(wrapped: WrappedModel, row_slots: list[int], rounds: int, reps: int, fn) -> dict[str, float]:  # noqa: ANN001
    """ms per forward, median over interleaved rounds."""
    variants = {"base": ([BASE_SLOT] * len(row_slots), "segment"), "segment": (row_slots, "segment"),
                "batched": (row_slots, "grouped")}  # fmt: skip
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, (slots, mode) in variants.items():
            with lora_batched.force(mode):
                fn(wrapped, slots)  # warm
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn(wrapped, slots)
                samples[name].append(1e3 * (time.perf_counter() - t0) / reps)
    return {k: statistics.median(v) for k, v in samples.items()}


def calibrate(rounds: int) -> None:
    """C_OP and C_COPY in MACs: t(small op) and t(per gathered element), each ÷ t(per MAC of a large mm)."""
    big_a, big_b = torch.randn(256, 512), torch.randn(512, 512)  # 67M MACs
    small_a, small_b = torch.randn(1, 512), torch.randn(512, 8)  # 4k MACs: all fixed cost
    src, idx = torch.randn(4096, 512), torch.randint(0, 4096, (2048,))
    samples: dict[str, list[float]] = {"mac": [], "op": [], "copy": []}
    for _ in range(rounds):
        for name, fn, n in (("mac", lambda: big_a @ big_b, 20), ("op", lambda: small_a @ small_b, 2000),
                            ("copy", lambda: src.index_select(0, idx), 50)):  # fmt: skip
            fn()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    mac = statistics.median(samples["mac"]) / (256 * 512 * 512)
    op = statistics.median(samples["op"])
    copy = statistics.median(samples["copy"]) / (2048 * 512)
    print(
        f"threads {torch.get_num_threads()}: {1 / mac / 1e9:.1f} GMAC/s; one small op {op * 1e6:.1f} us "
        f"= C_OP {op / mac:.3g} MACs; one gathered element {copy * 1e9:.2f} ns = C_COPY {copy / mac:.3g} MACs"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--level",
        choices=["model", "layers"],
        default="model",
        help="model: whole forwards; layers: only the adapted projections",
    )
    ap.add_argument("--calibrate", action="store_true", help="measure the cost model's C_OP and C_COPY instead")
    a = ap.parse_args()
    if a.calibrate:
        for threads in a.threads:
            torch.set_num_threads(threads)
            calibrate(a.rounds)
        return
    fn = forward if a.level == "model" else forward_layers
    wrapped = build(a.layers, max(a.adapters))
    print(
        f"llama hidden 512, {a.layers} layers, {a.rows} decode rows, LoRA r{RANK} on q,k,v,o; "
        f"ms per {'forward' if a.level == 'model' else 'pass over the q,k,v,o projections'}"
    )
    print(f"{'threads':>7} {'adapters':>8} {'lengths':>8} {'base':>7} {'segment':>8} {'batched':>8} "
          f"{'seg/base':>9} {'bat/base':>9} {'bat/seg':>8}")  # fmt: skip
    for threads in a.threads:
        torch.set_num_threads(threads)
        for nseg in a.adapters:
            for unequal in (False, True):
                if unequal and nseg == 1:
                    continue
                t = time_variants(wrapped, split_rows(a.rows, nseg, unequal), a.rounds, a.reps, fn)
                print(
                    f"{threads:>7} {nseg:>8} {'unequal' if unequal else 'equal':>8} {t['base']:7.2f} "
                    f"{t['segment']:8.2f} {t['batched']:8.2f} {t['base'] / t['segment']:9.2f} "
                    f"{t['base'] / t['batched']:9.2f} {t['batched'] / t['segment']:8.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
