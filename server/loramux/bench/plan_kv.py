"""The KV-cache suites: capacity (paging), shared prefix (prefix caching), chunked prefill.

Each suite starts its own servers with the flags it compares (same model, same KV
memory); ratios are taken within a round, as everywhere in the bench.
- capacity: one KV budget, prompts 16-512 and outputs 16-256 tokens at --max-model-len 4096.
  `capacity-rows` may hold only the requests one 4096-token row each would allow
  (--max-running = budget / row); `capacity-paged` holds as many as their blocks fit.
  Requests decoding at once: the most whose first-to-last-token spans overlap, as the client saw them.
- prefix: requests over several adapters sharing one long system prompt, each with its own
  turn, with and without prefix caching; their token ids must be identical. The warm-up
  sends the same prompts, so the system prompt's blocks are cached as in steady state.
- chunked: streams decode while long prompts arrive one after another (each stream decodes 4
  tokens between two of them, whatever the machine's speed); per-token latency of the
  streams over that window, on the default --max-batch-tokens and on a budget that takes
  a whole prompt in one step (the behaviour before chunked prefill).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import grpc

from loramux.bench.client import _one, run_requests
from loramux.bench.environment import Environment
from loramux.bench.result import RunResult
from loramux.bench.suite import Config, Ratio, Suite
from loramux.bench.target import LoramuxTarget
from loramux.bench.workload import BenchRequest, WorkloadSpec, make_requests
from loramux.v1 import loramux_pb2_grpc as pb_grpc

LONG_CONTEXT = 4096


def _config(
    name: str,
    description: str,
    target: LoramuxTarget,
    reqs: list[BenchRequest],
    clients: int,
    extra: dict | None = None,
    outputs: list | None = None,
    warm_all: bool = False,
) -> Config:
    def run(batch: list[BenchRequest] = reqs) -> RunResult:
        res = run_requests(target.address, name, batch, clients)
        res.extra = {"peak_running": res.peak_decoding(), **(extra or {})}
        if outputs is not None and batch is reqs:
            outputs.append(res.outputs)
        return res

    warm = list(reqs) if warm_all else reqs[:4]  # a copy: the warm-up's outputs are not compared
    return Config(
        name,
        description,
        run,
        warm=lambda: run(warm),
        target=target.name,
        workload={"requests": len(reqs), "clients": clients},
    )


def _capacity(env: Environment) -> Suite:
    o = env.opts
    rows = o.capacity_rows
    mb = rows * LONG_CONTEXT * env.kv_bytes_per_token() / 2**20
    common = dict(kv_cache_mb=round(mb, 3), max_model_len=LONG_CONTEXT)
    paged = env.extra_target("capacity-paged", env.kv_store([]), max_running=o.capacity_requests, **common)
    one_row = env.extra_target("capacity-rows", env.kv_store([]), max_running=rows, **common)
    spec = WorkloadSpec(num_requests=o.capacity_requests, clients=o.capacity_requests, prompt_len=o.capacity_prompt,
                        output_len=o.capacity_output, vocab=env.vocab, seed=o.seed)  # fmt: skip
    reqs = make_requests(spec)
    configs = [
        _config(
            "capacity-paged",
            f"KV blocks of 16 tokens, {mb:.0f} MiB",
            paged,
            reqs,
            spec.clients,
            {"max_running": o.capacity_requests},
        ),
        _config(
            "capacity-rows",
            f"the same {mb:.0f} MiB as {rows} rows of {LONG_CONTEXT} tokens",
            one_row,
            reqs,
            spec.clients,
            {"max_running": rows},
        ),
    ]
    ratios = [
        Ratio(
            "requests decoding at once / what one row per request allows",
            "capacity-paged",
            "capacity-rows",
            metric="peak_running",
            den_metric="max_running",
            goal=8.0,
            floor=8.0,
            issues=(15,),
        ),
        Ratio(
            "throughput: paged / one row per request",
            "capacity-paged",
            "capacity-rows",
            goal=1.0,
            floor=1.0,
            issues=(15,),
        ),
    ]
    title = (
        f"{spec.num_requests} requests, prompts {spec.prompt_len[0]}-{spec.prompt_len[1]}, outputs "
        f"{spec.output_len[0]}-{spec.output_len[1]} tokens, --max-model-len {LONG_CONTEXT}, {mb:.0f} MiB of KV"
    )
    return Suite("capacity", title, configs, ratios)


def _prefix(env: Environment) -> Suite:
    o = env.opts
    adapters = env.groups["mix"][: o.prefix_adapters]
    rng = random.Random(o.seed + 15)
    system = tuple(rng.randrange(*env.vocab) for _ in range(o.prefix_system_tokens))
    reqs = []
    for i in range(o.prefix_requests):
        turn = tuple(rng.randrange(*env.vocab) for _ in range(rng.randint(*o.prefix_turn)))
        reqs.append(BenchRequest(system + turn, o.prefix_output, adapters[i % len(adapters)]))
    longest = o.prefix_system_tokens + o.prefix_turn[1] + o.prefix_output
    ctx = dict(max_model_len=max(longest, 64), max_running=o.prefix_requests)
    on = env.extra_target("prefix-on", env.kv_store(adapters), **ctx)
    off = env.extra_target("prefix-off", env.kv_store(adapters), prefix_caching=False, **ctx)
    outputs: dict[str, list] = {"prefix-on": [], "prefix-off": []}
    configs = [
        _config(
            "prefix-on",
            "prefix caching on (default)",
            on,
            reqs,
            o.prefix_requests,
            outputs=outputs["prefix-on"],
            warm_all=True,
        ),
        _config(
            "prefix-off",
            "--no-prefix-caching",
            off,
            reqs,
            o.prefix_requests,
            outputs=outputs["prefix-off"],
            warm_all=True,
        ),
    ]
    ratios = [
        Ratio(
            "TTFT p50: without / with prefix caching",
            "prefix-off",
            "prefix-on",
            metric="ttft_p50",
            goal=10.0,
            floor=10.0,
            issues=(15,),
        ),
        Ratio("throughput: with / without prefix caching", "prefix-on", "prefix-off", issues=(15,)),
    ]

    def after(out: dict) -> None:
        pairs = list(zip(outputs["prefix-on"], outputs["prefix-off"]))
        same = bool(pairs) and all(a == b for a, b in pairs)
        out["notes"] = [
            f"outputs with and without prefix caching identical: {'yes' if same else 'NO'} "
            f"({len(pairs)} rounds x {len(reqs)} requests)"
        ]
        out["identical_outputs"] = same

    title = (
        f"{len(reqs)} requests over {len(adapters)} adapters sharing a {o.prefix_system_tokens}-token system "
        f"prompt, turns of {o.prefix_turn[0]}-{o.prefix_turn[1]} tokens, {o.prefix_output} output tokens"
    )
    return Suite("prefix", title, configs, ratios, after=after)


def _interference(
    target: LoramuxTarget, name: str, streams: list[BenchRequest], longs: list[BenchRequest], gap: int = 4
) -> RunResult:
    """Streams decode; once each has a token, the long prompts go out; the streams' gaps inside that window."""

    async def go() -> RunResult:
        res = RunResult(config=name, requests=len(streams))
        longs_res = RunResult(config=name, requests=len(longs))
        times: list[list[float]] = [[] for _ in streams]
        async with grpc.aio.insecure_channel(target.address) as ch:
            await asyncio.wait_for(ch.channel_ready(), 60)
            stub = pb_grpc.GenerationStub(ch)
            start = time.perf_counter()
            tasks = [asyncio.create_task(_one(stub, r, res, 600.0, i, times[i])) for i, r in enumerate(streams)]
            while not all(times) and not all(t.done() for t in tasks):
                await asyncio.sleep(0.005)
            t0 = time.perf_counter()
            for r in longs:  # one at a time; between two, every stream decodes `gap` tokens undisturbed
                await _one(stub, r, longs_res, 600.0)
                marks = [len(ts) + gap for ts in times]
                while any(len(ts) < m and not t.done() for ts, m, t in zip(times, marks, tasks)):
                    await asyncio.sleep(0.002)
            t1 = time.perf_counter()
            await asyncio.gather(*tasks)
            res.wall_s = time.perf_counter() - start
        # per-token gaps of the streams that overlap the window (a stall across a whole prefill counts)
        res.itl_s = [b - a for ts in times for a, b in zip(ts, ts[1:]) if b >= t0 and a <= t1]
        res.ttft_s = longs_res.ttft_s  # the long prompts' time to first token
        res.errors += longs_res.errors
        res.extra = {"window_s": t1 - t0, "window_tokens": len(res.itl_s)}
        return res

    return asyncio.run(go())


def _chunked(env: Environment) -> Suite:
    o = env.opts
    rng = random.Random(o.seed + 16)
    streams = [BenchRequest(tuple(rng.randrange(*env.vocab) for _ in range(32)), o.chunked_stream_output)
               for _ in range(o.chunked_streams)]  # fmt: skip
    longs = [BenchRequest(tuple(rng.randrange(*env.vocab) for _ in range(o.chunked_prompt_len)), 1)
             for _ in range(o.chunked_prompts)]  # fmt: skip
    ctx = dict(max_model_len=LONG_CONTEXT, max_running=o.chunked_streams + 4, prefix_caching=False)
    chunked = env.extra_target("chunked-default", env.kv_store([]), **ctx)
    whole = env.extra_target("chunked-off", env.kv_store([]), max_batch_tokens=LONG_CONTEXT + 64, **ctx)

    def config(name: str, description: str, target: LoramuxTarget) -> Config:
        run: Callable[[], RunResult] = lambda: _interference(target, name, streams, longs)  # noqa: E731
        warm = lambda: _interference(target, name, streams[:2], longs[:1])  # noqa: E731
        return Config(name, description, run, warm=warm, target=target.name,
                      workload={"streams": len(streams), "long_prompts": len(longs),
                                "long_prompt_len": o.chunked_prompt_len})  # fmt: skip

    configs = [
        config("chunked-default", "default --max-batch-tokens (chunked prefill)", chunked),
        config("chunked-off", f"--max-batch-tokens {LONG_CONTEXT + 64}: a prompt in one step", whole),
    ]
    ratios = [
        Ratio(
            "stream per-token p99 / p50 while long prompts arrive, default budget",
            "chunked-default",
            "chunked-default",
            metric="itl_p99",
            den_metric="itl_p50",
            goal=2.0,
            floor=2.0,
            higher_is_better=False,
            issues=(15,),
        ),
        Ratio(
            "the same, a whole prompt per step",
            "chunked-off",
            "chunked-off",
            metric="itl_p99",
            den_metric="itl_p50",
            higher_is_better=False,
            issues=(15,),
        ),
        Ratio(
            "long-prompt TTFT p50: chunked / whole",
            "chunked-default",
            "chunked-off",
            metric="ttft_p50",
            higher_is_better=False,
            issues=(15,),
        ),
    ]
    title = (
        f"{len(streams)} streams decoding while {len(longs)} prompts of {o.chunked_prompt_len} tokens arrive"
        " (one at a time, 4 stream tokens apart); latencies: streams' tokens in that window; TTFT: the long prompts'"
    )
    return Suite("chunked", title, configs, ratios)


KV_SUITES: dict[str, Callable[[Environment], Suite]] = {"capacity": _capacity, "prefix": _prefix,
                                                        "chunked": _chunked}  # fmt: skip
