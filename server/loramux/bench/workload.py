"""Workloads: which requests, over which adapters, with what lengths, arriving how.

Prompts and lengths come from one random stream and adapter choices from another,
so two workloads with the same seed and different adapters (base-only against
mixed, say) send exactly the same prompts and lengths: only the adapter differs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

POPULARITY = ("uniform", "zipf", "hot")


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    adapter_id: str = ""  # "" = the base model
    sampling: tuple[tuple[str, float], ...] = ()  # SamplingParams fields beyond the default greedy ones


@dataclass
class WorkloadSpec:
    num_requests: int = 64
    adapters: list[str] = field(default_factory=list)  # empty: every request on the base model
    popularity: str = "uniform"  # uniform | zipf | hot
    zipf_s: float = 1.0  # exponent: P(rank k) ~ 1 / k^s
    hot_share: float = 0.8  # popularity "hot": this share on adapters[0], the rest uniform over the others
    base_share: float = 0.0  # share of requests that name no adapter
    prompt_len: tuple[int, int] = (16, 64)  # uniform, inclusive
    output_len: tuple[int, int] = (8, 64)
    clients: int = 64  # closed loop: this many clients, each sends its next request when the last one ends
    rate: float = 0.0  # > 0: open loop, Poisson arrivals at this many requests per second
    vocab: tuple[int, int] = (3, 259)  # prompt token ids are drawn from [lo, hi)
    seed: int = 0
    sampling: dict[str, float] = field(default_factory=dict)  # e.g. temperature, top_p; empty: greedy

    def validate(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.popularity not in POPULARITY:
            raise ValueError(f"popularity must be one of {', '.join(POPULARITY)}, got {self.popularity!r}")
        for name, (lo, hi) in (("prompt_len", self.prompt_len), ("output_len", self.output_len)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be 1 <= lo <= hi, got {lo}..{hi}")
        if self.clients < 1 and self.rate <= 0:
            raise ValueError("a workload needs clients >= 1 (closed loop) or rate > 0 (Poisson)")
        if self.zipf_s < 0:
            raise ValueError(f"zipf_s must be >= 0, got {self.zipf_s}")
        for name, share in (("hot_share", self.hot_share), ("base_share", self.base_share)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {share}")
        if self.vocab[0] >= self.vocab[1]:
            raise ValueError(f"empty vocabulary range {self.vocab}")

    def describe(self) -> dict:
        n = len(self.adapters)
        return {
            "requests": self.num_requests,
            "adapters": n,
            "popularity": self.popularity if n else "-",
            "zipf_s": self.zipf_s if self.popularity == "zipf" else None,
            "hot_share": self.hot_share if self.popularity == "hot" else None,
            "base_share": self.base_share,
            "prompt_len": list(self.prompt_len),
            "output_len": list(self.output_len),
            "arrivals": f"poisson {self.rate}/s" if self.rate > 0 else f"closed loop, {self.clients} clients",
            "seed": self.seed,
            "sampling": dict(self.sampling) or "greedy",
        }


def make_requests(spec: WorkloadSpec) -> list[BenchRequest]:
    spec.validate()
    shapes = random.Random(spec.seed)
    picks = random.Random(spec.seed + 1_000_003)
    weights = popularity_weights(spec)
    out = []
    for _ in range(spec.num_requests):
        n_prompt = shapes.randint(*spec.prompt_len)
        prompt = tuple(shapes.randrange(*spec.vocab) for _ in range(n_prompt))
        n_out = shapes.randint(*spec.output_len)
        adapter = ""
        if spec.adapters and picks.random() >= spec.base_share:
            adapter = picks.choices(spec.adapters, weights=weights)[0]
        out.append(BenchRequest(prompt, n_out, adapter, tuple(sorted(spec.sampling.items()))))
    return out


def popularity_weights(spec: WorkloadSpec) -> list[float]:
    n = len(spec.adapters)
    if n == 0:
        return []
    if spec.popularity == "zipf":
        return [1.0 / (k**spec.zipf_s) for k in range(1, n + 1)]
    if spec.popularity == "hot":
        if n == 1:
            return [1.0]
        return [spec.hot_share] + [(1.0 - spec.hot_share) / (n - 1)] * (n - 1)
    return [1.0] * n


def arrival_times(spec: WorkloadSpec) -> list[float] | None:
    """Open loop: each request's send time (seconds from the start); closed loop: None."""
    if spec.rate <= 0:
        return None
    rng = random.Random(spec.seed + 2_000_003)
    t, out = 0.0, []
    for _ in range(spec.num_requests):
        out.append(t)
        t += rng.expovariate(spec.rate)
    return out


def static_batches(requests: list[BenchRequest], batch_size: int) -> list[list[BenchRequest]]:
    """Arrival order, `batch_size` at a time: what a static-batching server does."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
