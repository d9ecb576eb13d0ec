"""Everything a bench run can be told, with defaults sized for a few minutes on 2 CPU cores."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

SUITES = ("mixed", "hot", "kinds", "scale", "sampling", "http", "capacity", "prefix", "chunked", "ranks")
DEFAULT_SUITES = SUITES[:-1]  # `ranks` runs when asked for (--suites ranks)
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class BenchOptions:
    # the model and where loramux runs
    preset: str = "cpu"  # synthetic random-weight Llama: tiny | cpu | gpu-1b
    model: str | None = None  # a model directory instead of a synthetic preset
    device: str | None = None  # default: the preset's (auto for --model)
    dtype: str | None = None
    server: str | None = None  # HOST:PORT of a running server (instead of starting one)
    merged_server: str | None = None  # HOST:PORT of a running server with a merged cache
    metrics_url: str | None = None  # the running server's /metrics URL (for load times)
    spawn: str = "subprocess"  # how the bench starts its servers: subprocess | thread
    threads: int | None = None  # torch CPU threads, for the bench process and its servers alike (None: torch's)
    # --max-device-adapters of the servers the bench starts: 16 mixed adapters fit; the scale run's
    # working set (about 40 distinct adapters per run of 64 Zipf(1) requests over 1000) does not.
    device_slots: int = 32
    merged_cache_mb: float = 256.0  # --merged-cache-mb of the merged-cache server
    compile: bool = True  # the servers compile their decode step (off: --no-compile, every server eager)
    # what runs
    suites: tuple[str, ...] = DEFAULT_SUITES
    rounds: int = 2
    seed: int = 0
    # the main workload (suites mixed, hot, kinds)
    requests: int = 64
    clients: int = 64
    rate: float = 0.0  # > 0: Poisson arrivals at this rate instead of a closed loop
    prompt_len: tuple[int, int] = (16, 64)
    output_len: tuple[int, int] = (8, 64)
    adapters: int = 16
    rank: int = 16
    targets: tuple[str, ...] = QKVO
    popularity: str = "uniform"
    zipf_s: float = 1.0
    batch_size: int = 16  # the static baselines' batch size
    peft_loop: bool = True
    # suite hot: single-stream latency and an 80% hot-adapter mix
    single_requests: int = 8  # enough tokens (8 x 64) that the median per-token latency is stable
    single_output: int = 64
    hot_share: float = 0.8
    # suite kinds: adapters per kind
    kinds_per_group: int = 8
    bottleneck_width: int = 32
    soft_prompt_tokens: int = 16
    # suite scale
    scale_adapters: int = 1000
    scale_counts: tuple[int, ...] = (1, 16, 100, 1000)
    scale_rank: int = 4
    scale_targets: tuple[str, ...] = ("q_proj", "v_proj")
    scale_zipf_s: float = 1.0
    scale_requests: int = 64
    # suite capacity: one KV budget worth `capacity_rows` rows of 4096 tokens
    capacity_rows: int = 4
    capacity_requests: int = 48
    capacity_prompt: tuple[int, int] = (16, 512)
    capacity_output: tuple[int, int] = (16, 256)
    # suite prefix: a shared system prompt over several adapters
    prefix_requests: int = 64
    prefix_adapters: int = 8
    prefix_system_tokens: int = 1024
    prefix_turn: tuple[int, int] = (16, 64)
    prefix_output: int = 16
    # suite chunked: streams decoding while long prompts arrive
    chunked_streams: int = 16
    chunked_stream_output: int = 320  # long enough to decode through the whole window
    chunked_prompts: int = 4
    chunked_prompt_len: int = 2000
    # suite ranks (in process, no servers): a decode step per (adapters, ranks)
    rank_sweep: tuple[int, ...] = (8, 16, 64, 128, 256)  # plus a mix of 8..128
    rank_adapters: tuple[int, ...] = (1, 16, 64)
    rank_rows: int = 64
    rank_reps: int = 3
    rank_path: str = "auto"  # the LoRA path under test (lora_batched.PATHS)
    # output
    out: Path = field(default_factory=lambda: Path("bench-results"))
    workdir: Path | None = None  # default: a temporary directory, removed afterwards
    plots: bool = True

    def validate(self) -> None:
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown:
            raise ValueError(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
        if self.spawn not in ("subprocess", "thread"):
            raise ValueError(f"--spawn must be subprocess or thread, got {self.spawn!r}")
        for name in (
            "rounds",
            "requests",
            "adapters",
            "rank",
            "batch_size",
            "single_requests",
            "single_output",
            "kinds_per_group",
            "bottleneck_width",
            "soft_prompt_tokens",
            "scale_adapters",
            "scale_rank",
            "scale_requests",
            "device_slots",
            "capacity_rows",
            "capacity_requests",
            "prefix_requests",
            "prefix_adapters",
            "prefix_system_tokens",
            "prefix_output",
            "chunked_streams",
            "chunked_stream_output",
            "chunked_prompts",
            "chunked_prompt_len",
            "rank_rows",
            "rank_reps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if any(not 1 <= n <= self.scale_adapters for n in self.scale_counts):
            raise ValueError(f"--scale-counts must lie in 1..{self.scale_adapters}, got {self.scale_counts}")
        if any(n < 1 for n in (*self.rank_sweep, *self.rank_adapters)):
            raise ValueError("--rank-sweep and --rank-adapters take positive integers")
        from loramux.adapters.kinds.lora_batched import PATHS

        if self.rank_path not in PATHS:
            raise ValueError(f"--rank-path must be one of {', '.join(PATHS)}, got {self.rank_path!r}")
        if self.adapters < 2 and "hot" in self.suites:
            raise ValueError("suite hot needs --adapters >= 2 (one hot adapter and the others)")

    @property
    def scale_reference(self) -> int:
        """The count the full set is compared with: 16 (the issue's), or the smallest for tiny runs."""
        return 16 if self.scale_adapters > 16 else min((*self.scale_counts, self.scale_adapters))

    @property
    def counts(self) -> tuple[int, ...]:
        """The scale suite's adapter counts: always the reference and the full set."""
        return tuple(sorted({*self.scale_counts, self.scale_reference, self.scale_adapters}))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["workdir"] = str(self.workdir) if self.workdir else None
        return d
