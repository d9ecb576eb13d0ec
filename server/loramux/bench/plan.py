"""The standard suites: which configurations run side by side, on which workloads, and the ratios
the issues ask for (issue numbers are kept with each ratio, so the report can say which goal is which)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from loramux.bench.client import run_requests
from loramux.bench.cpu import CpuMeter
from loramux.bench.environment import Environment
from loramux.bench.http_client import run_http_requests
from loramux.bench.prom import counter_delta, histogram_delta
from loramux.bench.result import RunResult
from loramux.bench.suite import Config, Ratio, Suite
from loramux.bench.target import LoramuxTarget
from loramux.bench.workload import BenchRequest, WorkloadSpec, arrival_times, make_requests

LOAD_HISTOGRAM = "loramux_adapter_load_seconds"
MERGED_COUNTER = "loramux_merged_batches"


def build_suites(env: Environment) -> list[Suite]:
    from loramux.bench.plan_kv import KV_SUITES

    builders = {"mixed": _mixed, "hot": _hot, "kinds": _kinds, "scale": _scale, "sampling": _sampling, "http": _http,
                **KV_SUITES}  # fmt: skip
    return [builders[name](env) for name in env.opts.suites if name in builders]  # ranks: bench/ranks.py


def _spec(env: Environment, **overrides: object) -> WorkloadSpec:
    o = env.opts
    spec = WorkloadSpec(
        num_requests=o.requests,
        clients=o.clients,
        rate=o.rate,
        prompt_len=o.prompt_len,
        output_len=o.output_len,
        vocab=env.vocab,
        seed=o.seed,
        zipf_s=o.zipf_s,
    )
    return replace(spec, **overrides)


def _warm_requests(reqs: list[BenchRequest], slots: int) -> list[BenchRequest]:
    """A few short requests: one per adapter when they all fit the device slots, else the first eight."""
    adapters = list(dict.fromkeys(r.adapter_id for r in reqs))
    picked = [next(r for r in reqs if r.adapter_id == a) for a in adapters] if len(adapters) <= slots else reqs[:8]
    return [replace(r, max_new_tokens=min(r.max_new_tokens, 4)) for r in picked]


def _served(
    env: Environment,
    name: str,
    target: LoramuxTarget | None,
    spec: WorkloadSpec,
    description: str,
    merged: bool = False,
    warm_full: bool = False,
    http: bool = False,
) -> Config:
    """A configuration that sends `spec`'s requests to a loramux server (streamed, over gRPC or HTTP)."""
    if target is None or (http and not target.http_url):
        why = (
            "no HTTP API address (a running server was given with --server)"
            if target is not None
            else f"no merged-cache server: {env.merged_note or 'not started'}"
        )

        def missing() -> RunResult:
            raise RuntimeError(why)

        return Config(name, description, missing, warm=missing, workload=spec.describe(), target="-")
    reqs = make_requests(spec)
    arrivals = arrival_times(spec)

    def run(batch: list[BenchRequest] = reqs, times: list[float] | None = arrivals) -> RunResult:
        before, cpu = target.metrics_text(), CpuMeter(target)
        if http:
            res = run_http_requests(target.http_url, name, batch, spec.clients, times)
        else:
            res = run_requests(target.address, name, batch, spec.clients, times)
        after = target.metrics_text()
        loads = histogram_delta(before, after, LOAD_HISTOGRAM)
        res.extra = {
            "merged_batches": counter_delta(before, after, MERGED_COUNTER),
            "adapter_loads": loads["count"] if loads else None,
            **cpu.per_token(res.tokens),
        }
        return res

    warm_reqs = reqs[:16] if warm_full else _warm_requests(reqs, env.opts.device_slots)
    check = _merged_check if merged else None
    return Config(
        name,
        description,
        run,
        warm=lambda: run(warm_reqs, None),
        check=check,
        workload=spec.describe(),
        target=target.name,
    )


def _merged_check(runs: list[RunResult]) -> str | None:
    counts = [r.extra.get("merged_batches") for r in runs]
    if any(c is None for c in counts):
        return f"the server exports no {MERGED_COUNTER}_total counter"
    if sum(counts) == 0:
        return "the server ran no merged batches (no merged cache in this build, or its policy never merged)"
    return None


def _offline(
    name: str, description: str, fn: Callable[[list[BenchRequest]], RunResult], spec: WorkloadSpec, warm_count: int
) -> Config:
    reqs = make_requests(spec)
    warm = [replace(r, max_new_tokens=min(r.max_new_tokens, 4)) for r in reqs[:warm_count]]
    return Config(
        name, description, lambda: fn(reqs), warm=lambda: fn(warm), workload=spec.describe(), target="bench process"
    )


def _mixed(env: Environment) -> Suite:
    o, a, bl = env.opts, env.server, env.baselines
    base = _spec(env)
    mix = _spec(env, adapters=env.groups["mix"], popularity=o.popularity)
    k = len(env.groups["mix"])
    lora = f"{k} LoRA r{o.rank} ({','.join(o.targets)})"
    configs = [
        _served(env, "loramux-base", a, base, "loramux, base model only"),
        _served(env, "loramux-mixed", a, mix, f"loramux, {lora}, unmerged, one mixed batch"),
        _offline(
            "hf-static",
            f"transformers generate, static batches of {o.batch_size}",
            lambda r: bl.hf_static("hf-static", r, o.batch_size),
            base,
            o.batch_size,
        ),
        _offline(
            "peft-mixed",
            f"PEFT generate(adapter_names=...), static batches of {o.batch_size}",
            lambda r: bl.peft_mixed("peft-mixed", r, o.batch_size),
            mix,
            o.batch_size,
        ),
    ]
    if o.peft_loop:
        configs.append(
            _offline(
                "peft-loop",
                "PEFT set_adapter + generate, one request at a time",
                lambda r: bl.peft_loop("peft-loop", r),
                mix,
                2,
            )
        )
    ratios = [
        Ratio("base: loramux / transformers static", "loramux-base", "hf-static", goal=1.8, floor=1.0, issues=(2, 15)),
        Ratio("mixed adapters / base-only", "loramux-mixed", "loramux-base", goal=0.9, floor=0.8, issues=(3, 8, 15)),
        Ratio(
            "mixed adapters: loramux / PEFT mixed generate",
            "loramux-mixed",
            "peft-mixed",
            goal=3.0,
            floor=1.5,
            issues=(3, 8),
        ),
        Ratio("mixed adapters: loramux / PEFT set_adapter loop", "loramux-mixed", "peft-loop", issues=(8,)),
    ]
    title = (
        f"{o.requests} requests, prompts {o.prompt_len[0]}-{o.prompt_len[1]}, outputs "
        f"{o.output_len[0]}-{o.output_len[1]} tokens; mixed: {lora}, {o.popularity}"
    )
    return Suite("mixed", title, configs, ratios)


def _hot(env: Environment) -> Suite:
    o, a, b = env.opts, env.server, env.merged
    hot = env.groups["mix"][0]
    single = dict(num_requests=o.single_requests, clients=1, rate=0.0, output_len=(o.single_output, o.single_output))
    s_base, s_hot = _spec(env, **single), _spec(env, adapters=[hot], **single)
    h_base = _spec(env)
    h_mix = _spec(env, adapters=env.groups["mix"], popularity="hot", hot_share=o.hot_share)
    configs = [
        _served(env, "single-base", a, s_base, "one stream, base model"),
        _served(env, "single-unmerged", a, s_hot, f"one stream, adapter {hot} unmerged"),
        _served(env, "single-base-msrv", b, s_base, "one stream, base model, on the merged-cache server"),
        _served(env, "single-merged", b, s_hot, f"one stream, adapter {hot} merged", merged=True, warm_full=True),
        _served(env, "hot80-base", a, h_base, "the hot workload's requests on the base model"),
        _served(env, "hot80-unmerged", a, h_mix, f"{o.hot_share:.0%} on {hot}, the rest over the others, unmerged"),
        _served(env, "hot80-merged", b, h_mix, f"the same, {hot} merged", merged=True, warm_full=True),
    ]
    ratios = [
        Ratio(
            "per-token latency: merged / base",
            "single-merged",
            "single-base-msrv",
            metric="itl_p50",
            goal=1.02,
            floor=1.05,
            higher_is_better=False,
            issues=(5, 8),
        ),
        Ratio(
            "per-token latency: unmerged / base",
            "single-unmerged",
            "single-base",
            metric="itl_p50",
            higher_is_better=False,
            issues=(5,),
        ),
        Ratio(f"{o.hot_share:.0%} hot adapter merged / base throughput", "hot80-merged", "hot80-base", issues=(5,)),
        Ratio(f"{o.hot_share:.0%} hot adapter unmerged / base throughput", "hot80-unmerged", "hot80-base", issues=(5,)),
    ]
    title = (
        f"single stream ({o.single_requests} x {o.single_output} tokens) and {o.requests} requests with "
        f"{o.hot_share:.0%} on one adapter; merged cache {o.merged_cache_mb:g} MB"
    )
    return Suite("hot", title, configs, ratios)


def _kinds(env: Environment) -> Suite:
    o, a, g = env.opts, env.server, env.groups
    n = o.kinds_per_group
    mix = g["mix"][:n]
    combos = {
        "lora+bottleneck": (
            mix + g["bottleneck"],
            f"{len(mix)} LoRA + {n} bottleneck (seq_bn, width {o.bottleneck_width})",
            (6,),
        ),
        "lora+soft-prompt": (
            mix + g["soft_prompt"],
            f"{len(mix)} LoRA + {n} soft prompts ({o.soft_prompt_tokens} virtual tokens)",
            (9,),
        ),
        "dora+ia3": (g["dora"] + g["ia3"], f"{n} DoRA r{o.rank} + {n} IA3", (8,)),
    }
    configs = [_served(env, "kinds-base", a, _spec(env), "base model only")]
    ratios = []
    for name, (ids, description, issues) in combos.items():
        configs.append(_served(env, name, a, _spec(env, adapters=ids), description))
        ratios.append(Ratio(f"{name} / base-only", name, "kinds-base", issues=issues))
    return Suite("kinds", f"{o.requests} requests over adapters of each kind, uniform", configs, ratios)


def _scale(env: Environment) -> Suite:
    o, a = env.opts, env.server
    ids = env.groups["scale"]
    ref = o.scale_reference
    configs = [_served(env, "scale-base", a, _spec(env, num_requests=o.scale_requests), "base model only")]
    for n in o.counts:
        spec = _spec(env, num_requests=o.scale_requests, adapters=ids[:n], popularity="zipf", zipf_s=o.scale_zipf_s)
        configs.append(_served(env, f"scale-n{n}", a, spec, f"{n} LoRA r{o.scale_rank}, Zipf({o.scale_zipf_s:g})"))
    ratios = [
        Ratio(
            f"{len(ids)} adapters / {ref} adapters",
            f"scale-n{len(ids)}",
            f"scale-n{ref}",
            goal=0.7,
            floor=0.7,
            issues=(8,),
        )
    ]
    ratios += [Ratio(f"{n} adapter{'s' * (n != 1)} / base-only", f"scale-n{n}", "scale-base") for n in o.counts]
    state: dict[str, str | None] = {}

    def before() -> None:
        state["metrics"] = a.metrics_text()

    def after(out: dict) -> None:
        out["adapter_load_seconds"] = histogram_delta(state.get("metrics"), a.metrics_text(), LOAD_HISTOGRAM)
        out["device_slots"] = o.device_slots

    title = (
        f"{len(ids)} registered LoRA adapters (r{o.scale_rank}, {','.join(o.scale_targets)}), "
        f"Zipf({o.scale_zipf_s:g}) popularity, {o.device_slots} device slots, {o.scale_requests} requests"
    )
    return Suite("scale", title, configs, ratios, after=after, before=before)


SAMPLED = {"temperature": 0.8, "top_p": 0.9, "top_k": 50}
PENALTIES = {**SAMPLED, "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5}


def _sampling(env: Environment) -> Suite:
    """The batch sampler's cost: the mixed workload greedy, sampled and with penalties, and one stream
    against plain `transformers` `generate` (per-token latency, same model, same threads)."""
    o, a, bl = env.opts, env.server, env.baselines
    mix = dict(adapters=env.groups["mix"], popularity=o.popularity)
    single = dict(num_requests=o.single_requests, clients=1, rate=0.0, output_len=(o.single_output, o.single_output))
    s_base = _spec(env, **single)
    configs = [
        _served(env, "mixed-greedy", a, _spec(env, **mix), "mixed adapters, greedy"),
        _served(env, "mixed-sampled", a, _spec(env, **mix, sampling=SAMPLED), f"mixed adapters, {SAMPLED}"),
        _served(env, "mixed-penalties", a, _spec(env, **mix, sampling=PENALTIES), f"mixed adapters, {PENALTIES}"),
        _served(env, "single-loramux", a, s_base, "one stream, base model"
                + ("" if o.compile else " (--no-compile)")),
        *([_served(env, "single-eager", env.eager_server(), s_base, "one stream, base model, --no-compile")]
          if o.compile and not o.server else []),
        _offline("single-hf", "transformers generate, one request at a time",
                 lambda r: bl.hf_static("single-hf", r, 1), s_base, 1),
    ]  # fmt: skip
    ratios = [
        Ratio("sampled / greedy throughput", "mixed-sampled", "mixed-greedy", goal=0.95, floor=0.9, issues=(16,)),
        Ratio("penalties / greedy throughput", "mixed-penalties", "mixed-greedy", goal=0.9, floor=0.85,
              issues=(16,)),
        Ratio("per-token latency: loramux / transformers generate, one stream", "single-loramux", "single-hf",
              metric="itl_p50", goal=0.12, higher_is_better=False, issues=(16,)),
        *([Ratio("per-token latency: compiled / eager decode step, one stream", "single-loramux", "single-eager",
                 metric="itl_p50", higher_is_better=False, issues=(16,))] if o.compile and not o.server else []),
    ]  # fmt: skip
    title = f"{o.requests} requests over {len(env.groups['mix'])} adapters, greedy / sampled / penalties; one stream"
    return Suite("sampling", title, configs, ratios)


def _http(env: Environment) -> Suite:
    """The mixed workload streamed over the OpenAI-compatible API and over gRPC, to the same server."""
    o, a = env.opts, env.server
    mix = _spec(env, adapters=env.groups["mix"], popularity=o.popularity)
    k = len(env.groups["mix"])
    configs = [
        _served(env, "grpc-stream", a, mix, f"gRPC GenerateStream, {k} LoRA r{o.rank}, one mixed batch"),
        _served(env, "http-stream", a, mix, "HTTP /v1/completions SSE, the same requests", http=True),
    ]
    cpu = {"higher_is_better": False, "issues": (17,)}  # where the time goes: lower is leaner
    ratios = [
        Ratio("HTTP streaming / gRPC streaming", "http-stream", "grpc-stream", goal=0.9, floor=0.9, issues=(17,)),
        Ratio("client CPU per token, HTTP / gRPC", "http-stream", "grpc-stream", "client_cpu_ms_per_token", **cpu),
        Ratio("server CPU per token, HTTP / gRPC", "http-stream", "grpc-stream", "server_cpu_ms_per_token", **cpu),
        Ratio("server event-loop thread CPU per token, HTTP / gRPC", "http-stream", "grpc-stream",
              "server_loop_cpu_ms_per_token", **cpu),
    ]  # fmt: skip
    title = f"the mixed workload ({o.requests} requests, {o.clients} clients) over both APIs of one server"
    return Suite("http", title, configs, ratios)
