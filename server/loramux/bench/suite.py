"""A suite: configurations run side by side, interleaved round by round, and the ratios between them.

Machine drift (other jobs on a shared CPU, thermal limits) hits every configuration
alike when they take turns: each round runs every configuration once, in an order
rotated by one each round, and each ratio is taken within a round before the
median over rounds is reported.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loramux.bench.result import RunResult, metric, summarize

log = logging.getLogger("loramux.bench")


@dataclass
class Config:
    name: str
    description: str
    run: Callable[[], RunResult]
    warm: Callable[[], RunResult] | None = None  # untimed, before round 1: loads adapters, finds what fails
    # After all rounds: why the configuration did not really run as described (None = it did).
    check: Callable[[list[RunResult]], str | None] | None = None
    workload: dict = field(default_factory=dict)
    target: str = ""


@dataclass
class Ratio:
    name: str
    num: str  # config names
    den: str
    metric: str = "throughput"  # throughput, itl_p50/p99, ttft_p50, peak_running, max_running, *_cpu_ms_per_token
    den_metric: str | None = None  # the denominator's metric when it differs (default: `metric`)
    goal: float | None = None
    floor: float | None = None  # the least that counts as done (issues give a floor and a goal)
    higher_is_better: bool = True
    issues: tuple[int, ...] = ()

    def judge(self, value: float, bound: float | None) -> bool | None:
        if bound is None:
            return None
        return value >= bound if self.higher_is_better else value <= bound


@dataclass
class Suite:
    name: str
    title: str
    configs: list[Config]
    ratios: list[Ratio] = field(default_factory=list)
    after: Callable[[dict], None] | None = None  # adds suite-level findings (e.g. load times) to the result
    before: Callable[[], None] | None = None

    def run(self, rounds: int) -> dict:
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        unavailable: dict[str, str] = {}
        if self.before is not None:
            self.before()
        for c in self.configs:
            if c.warm is not None:
                reason = _attempt(c, c.warm)
                if reason:
                    unavailable[c.name] = reason
                    log.warning("%s/%s unavailable: %s", self.name, c.name, reason)
        runs: dict[str, list[RunResult]] = {c.name: [] for c in self.configs}
        t0 = time.perf_counter()
        for k in range(rounds):
            order = self.configs[k % len(self.configs) :] + self.configs[: k % len(self.configs)]
            for c in order:
                if c.name in unavailable:
                    continue
                res = c.run()
                reason = _reason(c, res)
                if reason:
                    unavailable[c.name] = reason
                    log.warning("%s/%s unavailable: %s", self.name, c.name, reason)
                    continue
                runs[c.name].append(res)
                log.info(
                    "%s round %d/%d %-22s %8.1f tok/s  (%d tokens, %.1fs)",
                    self.name,
                    k + 1,
                    rounds,
                    c.name,
                    res.throughput,
                    res.tokens,
                    res.wall_s,
                )
        for c in self.configs:
            reason = c.check(runs[c.name]) if c.check is not None and c.name not in unavailable else None
            if reason:
                unavailable[c.name] = reason
                log.warning("%s/%s unavailable: %s", self.name, c.name, reason)
        out = {
            "title": self.title,
            "rounds": rounds,
            "seconds": time.perf_counter() - t0,
            "configs": {},
            "ratios": [],
        }
        for c in self.configs:
            entry = {
                "description": c.description,
                "target": c.target,
                "workload": c.workload,
                # raw latencies for the plots; report.py leaves them out of the JSON
                "_samples": {
                    "ttft_s": [x for r in runs[c.name] for x in r.ttft_s],
                    "itl_s": [x for r in runs[c.name] for x in r.itl_s],
                },
            }
            if c.name in unavailable:
                entry.update(status="unavailable", reason=unavailable[c.name])
            else:
                entry.update(
                    status="ok", summary=summarize(runs[c.name]), extra=[r.extra for r in runs[c.name] if r.extra]
                )
            out["configs"][c.name] = entry
        for r in self.ratios:
            out["ratios"].append(_ratio(r, runs, unavailable))
        if self.after is not None:
            self.after(out)
        return out


def _attempt(c: Config, fn: Callable[[], RunResult]) -> str | None:
    try:
        return _reason(c, fn())
    except Exception as e:  # a configuration the build cannot run is reported, never fatal
        log.exception("%s failed", c.name)
        return f"{type(e).__name__}: {e}"


def _reason(c: Config, res: RunResult) -> str | None:
    if res.errors:
        return f"{len(res.errors)} of {res.requests} requests failed; first: {res.errors[0]}"
    if res.tokens == 0:
        return "no tokens were generated"
    return None


def _ratio(r: Ratio, runs: dict[str, list[RunResult]], unavailable: dict[str, str]) -> dict:
    out = {
        "name": r.name,
        "num": r.num,
        "den": r.den,
        "metric": r.metric,
        "den_metric": r.den_metric or r.metric,
        "goal": r.goal,
        "floor": r.floor,
        "higher_is_better": r.higher_is_better,
        "issues": list(r.issues),
    }
    missing = [n for n in (r.num, r.den) if n in unavailable or not runs.get(n)]
    if missing:
        out.update(
            value=None, status="unavailable", reason="; ".join(f"{n}: {unavailable.get(n, 'not run')}" for n in missing)
        )
        return out
    per_round = []
    for a, b in zip(runs[r.num], runs[r.den]):  # round k of one against round k of the other
        x, y = metric(a, r.metric), metric(b, r.den_metric or r.metric)
        if x is not None and y:
            per_round.append(x / y)
    if not per_round:
        out.update(value=None, status="unavailable", reason=f"no {r.metric} values")
        return out
    value = statistics.median(per_round)
    out.update(
        value=value,
        rounds=[round(v, 4) for v in per_round],
        status="ok",
        meets_goal=r.judge(value, r.goal),
        meets_floor=r.judge(value, r.floor),
    )
    return out
