"""A few rows through every projection of a model: ATen `mm` against the compiled graphs' products.

A decode step of few rows multiplies them by every weight of the model, bound by reading the
weights. This times the projections of the bench's synthetic model (`--preset cpu`, loaded
through `from_pretrained`) on `--rows` rows three ways, taking turns round after round: eager
(`F.linear`, ATen's `mm`), compiled with inductor's defaults (it calls the same `mm`), and
compiled with `engine.compiled.inductor_options` (engine/products.py: a multiply and sum that
reads each weight row once for all rows; the row count is static here), beside a plain `sum`
over the same weights, which reads them once at the memory's speed. Prints milliseconds per
pass and the ratios:

    PYTHONPATH=server .venv/bin/python scripts/bench_gemv.py --threads 1 --rounds 5 --rows 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from loramux.bench.synthetic import write_synthetic_model
from loramux.engine.compiled import inductor_options
from loramux.model import load_base_model


class Projections(nn.Module):
    """The model's linear layers, each applied to a row of its input width."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, rows: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [layer(rows[layer.in_features]) for layer in self.layers]


def _ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1e3 * (time.perf_counter() - t0) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--rows", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base_model(str(write_synthetic_model("cpu", Path(tmp) / "model")), device="cpu", dtype="float32")
    layers = [m for m in base.model.modules() if isinstance(m, nn.Linear)]
    proj = Projections(layers).eval()
    rows = {n: torch.randn(a.rows, n) for n in {m.in_features for m in layers}}
    mb = sum(m.weight.numel() * m.weight.element_size() for m in layers) / 1e6
    with torch.no_grad():
        default = torch.compile(proj, dynamic=False)
        fused = torch.compile(proj, options=inductor_options(proj), dynamic=False)
        for want, got in zip(proj(rows), fused(rows)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        ways = {
            "eager mm": lambda: proj(rows),
            "compiled, mm": lambda: default(rows),
            "compiled, fused": lambda: fused(rows),
            "sum of the weights": lambda: [m.weight.sum() for m in layers],
        }
        times: dict[str, list[float]] = {k: [] for k in ways}
        for r in range(a.rounds):
            order = list(ways)[r % len(ways) :] + list(ways)[: r % len(ways)]  # rotate: drift hits all alike
            for k in order:
                times[k].append(_ms(ways[k], a.reps))
    print(
        f"{len(layers)} projections, {mb:.1f} MB of weights, {a.rows} row(s), {a.threads} thread(s), {a.rounds} rounds"
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:20s} {v:7.2f} ms  ({mb / v:5.1f} GB/s)")
    print(f"compiled, fused / eager mm: {med['compiled, fused'] / med['eager mm']:.2f}")
    print(f"compiled, fused / compiled, mm: {med['compiled, fused'] / med['compiled, mm']:.2f}")


if __name__ == "__main__":
    main()
