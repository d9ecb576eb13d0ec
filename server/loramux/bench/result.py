"""One run of one configuration, and the statistics reported for it."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class RunResult:
    config: str
    wall_s: float = 0.0
    tokens: int = 0  # generated tokens the requests asked for (static batches' padding steps do not count)
    requests: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)  # per generated token after the first
    errors: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    outputs: dict[int, list[int]] = field(default_factory=dict)  # request index -> generated token ids
    token_times: dict[int, list[float]] = field(default_factory=dict)  # request index -> arrival of each token

    def peak_decoding(self) -> int:
        """Most requests decoding at once: between their first and last token, as the client saw them."""
        spans = [(ts[0], ts[-1]) for ts in self.token_times.values() if len(ts) > 1]
        return max((sum(a <= t < b for a, b in spans) for t, _ in spans), default=0)

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(runs: list[RunResult]) -> dict:
    """Over a configuration's timed rounds: median throughput; latency percentiles over all tokens."""
    if not runs:
        return {}
    ttft = [x for r in runs for x in r.ttft_s]
    itl = [x for r in runs for x in r.itl_s]
    return {
        "throughput_tok_s": statistics.median(r.throughput for r in runs),
        "throughput_rounds": [round(r.throughput, 3) for r in runs],
        "tokens": runs[0].tokens,
        "requests": runs[0].requests,
        "wall_s_median": statistics.median(r.wall_s for r in runs),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
        "itl_median_of_rounds_s": statistics.median(statistics.median(r.itl_s) for r in runs if r.itl_s)
        if any(r.itl_s for r in runs)
        else None,
    }


def metric(run: RunResult, name: str) -> float | None:
    """A run's value of a ratio metric: throughput, or a latency median."""
    if name == "throughput":
        return run.throughput
    if name == "itl_p50":
        return percentile(run.itl_s, 50)
    if name == "ttft_p50":
        return percentile(run.ttft_s, 50)
    if name == "itl_p99":
        return percentile(run.itl_s, 99)
    if name in ("peak_running", "max_running"):  # requests holding KV at once (sampled), and their cap
        return run.extra.get(name)
    if name in ("client_cpu_ms_per_token", "server_cpu_ms_per_token", "server_loop_cpu_ms_per_token"):  # bench/cpu.py
        return run.extra.get(name)
    raise ValueError(f"unknown metric {name!r}")
