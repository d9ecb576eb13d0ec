"""`loramux bench`: picked up by loramux.cli through `add_parsers`."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

from loramux.bench.options import SUITES, BenchOptions

log = logging.getLogger("loramux.bench")


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.replace("-", ":").partition(":")
    try:
        return (int(lo), int(hi if sep else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_parsers(sub: argparse._SubParsersAction) -> None:
    d = BenchOptions()
    p = sub.add_parser(
        "bench",
        help="benchmark loramux against transformers and PEFT on the same requests",
        description="Runs configurations side by side (interleaved rounds) and writes "
        "result.json, result.md and PNG plots (with the 'plots' extra) under --out.",
    )
    g = p.add_argument_group("model and servers")
    g.add_argument(
        "--preset",
        default=d.preset,
        choices=["tiny", "cpu", "gpu-1b"],
        help="synthetic random-weight Llama (cpu: hidden 512, 4 layers; gpu-1b: ~1B, bfloat16, CUDA)",
    )
    g.add_argument("--model", default=None, help="a model directory instead of a synthetic preset")
    g.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--server", default=None, help="HOST:PORT of a running server (adapters are uploaded to it)")
    g.add_argument("--merged-server", default=None, help="HOST:PORT of a running server with a merged cache")
    g.add_argument("--metrics-url", default=None, help="the running server's /metrics URL (adapter load times)")
    g.add_argument("--spawn", default=d.spawn, choices=["subprocess", "thread"], help="how to start the servers")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for the bench process and the servers it starts (default: torch's)",
    )
    g.add_argument("--device-slots", type=int, default=d.device_slots, help="--max-device-adapters of the servers")
    g.add_argument("--merged-cache-mb", type=float, default=d.merged_cache_mb)
    g.add_argument("--no-compile", dest="compile", action="store_false",
                   help="start every server with --no-compile (every decode step eager)")  # fmt: skip
    g = p.add_argument_group("what runs")
    g.add_argument("--suites", type=_names, default=d.suites, help=f"comma-separated, of {','.join(SUITES)}")
    g.add_argument("--rounds", type=int, default=d.rounds, help="interleaved timed rounds per suite")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("workload")
    g.add_argument("--requests", type=int, default=d.requests)
    g.add_argument("--clients", type=int, default=d.clients, help="closed loop: concurrent clients")
    g.add_argument("--rate", type=float, default=d.rate, help="> 0: Poisson arrivals (requests/s) instead")
    g.add_argument("--prompt-len", type=_range, default=d.prompt_len, help="LO:HI tokens, uniform")
    g.add_argument("--output-len", type=_range, default=d.output_len, help="LO:HI tokens, uniform")
    g.add_argument("--adapters", type=int, default=d.adapters, help="LoRA adapters in the mixed workload")
    g.add_argument("--rank", type=int, default=d.rank)
    g.add_argument("--targets", type=_names, default=d.targets, help="LoRA target modules, comma-separated")
    g.add_argument("--popularity", default=d.popularity, choices=["uniform", "zipf"])
    g.add_argument("--zipf-s", type=float, default=d.zipf_s)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="static baselines' batch size")
    g.add_argument("--no-peft-loop", dest="peft_loop", action="store_false", help="skip the set_adapter loop")
    g.add_argument("--single-requests", type=int, default=d.single_requests)
    g.add_argument("--single-output", type=int, default=d.single_output)
    g.add_argument("--hot-share", type=float, default=d.hot_share)
    g.add_argument("--kinds-per-group", type=int, default=d.kinds_per_group)
    g.add_argument("--bottleneck-width", type=int, default=d.bottleneck_width)
    g.add_argument("--soft-prompt-tokens", type=int, default=d.soft_prompt_tokens)
    g.add_argument("--scale-adapters", type=int, default=d.scale_adapters)
    g.add_argument("--scale-counts", type=_ints, default=d.scale_counts)
    g.add_argument("--scale-rank", type=int, default=d.scale_rank)
    g.add_argument("--scale-targets", type=_names, default=d.scale_targets)
    g.add_argument("--scale-zipf-s", type=float, default=d.scale_zipf_s)
    g.add_argument("--scale-requests", type=int, default=d.scale_requests)
    g.add_argument(
        "--capacity-rows",
        type=int,
        default=d.capacity_rows,
        help="capacity suite: the KV budget, in rows of 4096 tokens",
    )
    g.add_argument("--capacity-requests", type=int, default=d.capacity_requests)
    g.add_argument("--capacity-prompt", type=_range, default=d.capacity_prompt)
    g.add_argument("--capacity-output", type=_range, default=d.capacity_output)
    g.add_argument("--prefix-requests", type=int, default=d.prefix_requests)
    g.add_argument("--prefix-adapters", type=int, default=d.prefix_adapters)
    g.add_argument("--prefix-system-tokens", type=int, default=d.prefix_system_tokens)
    g.add_argument("--prefix-turn", type=_range, default=d.prefix_turn)
    g.add_argument("--prefix-output", type=int, default=d.prefix_output)
    g.add_argument("--chunked-streams", type=int, default=d.chunked_streams)
    g.add_argument("--chunked-stream-output", type=int, default=d.chunked_stream_output)
    g.add_argument("--chunked-prompts", type=int, default=d.chunked_prompts)
    g.add_argument("--chunked-prompt-len", type=int, default=d.chunked_prompt_len)
    g.add_argument("--rank-sweep", type=_ints, default=d.rank_sweep, help="suite ranks: LoRA ranks (plus a mix)")
    g.add_argument("--rank-adapters", type=_ints, default=d.rank_adapters, help="suite ranks: adapters per batch")
    g.add_argument("--rank-rows", type=int, default=d.rank_rows, help="suite ranks: decode rows per forward")
    g.add_argument("--rank-reps", type=int, default=d.rank_reps, help="suite ranks: forwards per timing")
    g.add_argument("--rank-path", default=d.rank_path, help="suite ranks: the LoRA path (auto, grouped, ...)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=d.out)
    g.add_argument("--workdir", type=Path, default=None, help="keep the model, stores and server logs here")
    g.add_argument("--no-plots", dest="plots", action="store_false")
    p.set_defaults(func=main)


def options_from_args(a: argparse.Namespace) -> BenchOptions:
    return BenchOptions(**{f.name: getattr(a, f.name) for f in fields(BenchOptions) if hasattr(a, f.name)})


def main(a: argparse.Namespace) -> int:
    try:
        opts = options_from_args(a)
        opts.validate()
    except ValueError as e:
        print(f"loramux bench: {e}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(opts)
    print(result["markdown"])
    print(f"\nwrote {opts.out / 'result.json'} and {opts.out / 'result.md'}", file=sys.stderr)
    return 0


def run(opts: BenchOptions) -> dict:
    """Set up, run every suite, tear down, write the report; returns the result (with its Markdown)."""
    from loramux.bench.environment import Environment
    from loramux.bench.plan import build_suites
    from loramux.bench.report import markdown, plot, write_json

    if opts.threads is not None:  # the baselines run here; a thread-spawned server shares this setting
        import torch

        torch.set_num_threads(opts.threads)
    temporary = opts.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="loramux-bench-")) if temporary else opts.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    env = Environment(opts, workdir)
    result: dict = {"options": opts.to_dict(), "rounds": opts.rounds, "suites": {}}
    started = time.time()
    load_before = _loadavg()
    try:
        if "ranks" in opts.suites:  # in process, before any server starts
            from loramux.bench.ranks import RankBench

            log.info("suite ranks: in process")
            result["ranks"] = RankBench(opts).run()
        env.start()
        result["model"] = _model_info(env)
        result["setup_s"] = env.setup_s
        result["merged_server_note"] = env.merged_note
        for suite in build_suites(env):
            log.info("suite %s: %s", suite.name, suite.title)
            result["suites"][suite.name] = suite.run(opts.rounds)
    finally:
        env.stop()
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    result["machine"] = _machine(env, load_before)
    result["seconds"] = time.time() - started
    opts.out.mkdir(parents=True, exist_ok=True)
    result["plots"] = plot(result, opts.out) if opts.plots else []
    result["markdown"] = markdown(result)
    write_json({k: v for k, v in result.items() if k != "markdown"}, opts.out / "result.json")
    (opts.out / "result.md").write_text(result["markdown"])
    return result


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _machine(env, load_before: list[float] | None) -> dict:  # noqa: ANN001 (an Environment)
    import torch

    cpus = os.cpu_count()
    if env.device.startswith("cuda") or (env.device == "auto" and torch.cuda.is_available()):
        what = f"{torch.cuda.get_device_name(0)} GPU"
    else:
        what = f"{cpus}-core CPU ({platform.machine()}), {torch.get_num_threads()} torch threads"
    return {
        "description": what,
        "cpus": cpus,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
    }


def _model_info(env) -> dict:  # noqa: ANN001 (an Environment)
    s = env.shape
    name = env.opts.model or f"synthetic Llama (preset {env.opts.preset}, random weights)"
    return {
        "description": f"{name}: {s.num_params / 1e6:.1f}M parameters, hidden {s.hidden_size}, "
        f"{s.num_layers} layers, {env.dtype} on {env.device}",
        "params": s.num_params,
        "hidden_size": s.hidden_size,
        "layers": s.num_layers,
        "device": env.device,
        "dtype": env.dtype,
    }
