"""Every Prometheus collector of loramux, in one place.

Each `Metrics` owns its own `CollectorRegistry`, so several servers (or tests) in
one process never clash over the global default registry. All methods are cheap
and thread-safe: the collectors lock internally, and the one piece of our own
state (the bounded adapter labels) has its own lock.
"""

from __future__ import annotations

import sys
import threading
from importlib import metadata
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client import start_http_server as _prom_start_http_server

from loramux.adapter_labels import AdapterLabels

# Latency buckets from 1 ms (a GPU decode step) to 60 s (a long CPU generation):
# dense at the low end, where inter-token and forward times live.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# Label values created up front so their series exist (at 0) from the first
# scrape; rate() and absent() then behave. Other values are accepted as given:
# a metrics call must never raise on the engine's hot path.
# Cache tiers an adapter is looked up in / loaded into; residency is also
# reported for the on-disk store.
CACHE_TIERS: tuple[str, ...] = ("host", "device", "merged")
RESIDENT_TIERS: tuple[str, ...] = ("store", *CACHE_TIERS)
PHASES: tuple[str, ...] = ("prefill", "decode")
# The values the engine reports (scheduler: "cancelled" or "deadline"), plus
# "rejected": refused at admission, before it was queued (see request_rejected).
STATUSES: tuple[str, ...] = ("ok", "cancelled", "deadline", "rejected", "error")
# Why a request was refused at admission: the gRPC status code it got, lower case.
REJECT_REASONS: tuple[str, ...] = ("invalid_argument", "not_found", "resource_exhausted", "unavailable")
MERGE_ACTIONS: tuple[str, ...] = ("merge", "unmerge", "evict")
# The APIs a request can come through.
FRONTENDS: tuple[str, ...] = ("grpc", "http")


def _package_version() -> str:
    try:
        return metadata.version("loramux")
    except metadata.PackageNotFoundError:  # running from a source tree (PYTHONPATH=server)
        return "0+unknown"


class Metrics:
    """All loramux collectors, registered in a private registry."""

    def __init__(
        self,
        max_adapter_labels: int = 32,
        adapter_label_half_life_s: float = 300.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry

        def hist(
            name: str, doc: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = LATENCY_BUCKETS
        ) -> Histogram:
            return Histogram(name, doc, labels, registry=r, buckets=buckets)

        # prometheus_client appends `_total` to counter names itself, so counters
        # are declared without it; the exposed names are those of DESIGN.md.
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        self.ttft = hist("loramux_time_to_first_token_seconds", "Arrival to first generated token.")
        self.inter_token = hist("loramux_inter_token_latency_seconds", "Time between consecutive tokens of a request.")
        self.request_latency = hist("loramux_request_latency_seconds", "Arrival to finish, per request.")
        self.request_queue = hist("loramux_request_queue_seconds", "Arrival to admission into the running batch.")
        self.adapter_load_seconds = hist(
            "loramux_adapter_load_seconds", "Time to bring an adapter into a tier.", ("tier",)
        )
        self.batch_forward = hist("loramux_batch_forward_seconds", "One model forward.", ("phase",))
        self.batch_size = hist(
            "loramux_batch_size", "Sequences in one model forward.", ("phase",), buckets=BATCH_SIZE_BUCKETS
        )

        self.requests = counter(
            "loramux_requests", "Requests that ended, by final status (rejected = refused at admission).", ("status",)
        )
        self.frontend_requests = counter(
            "loramux_frontend_requests",
            "Requests that ended, by the API they came through and final status.",
            ("frontend", "status"),
        )
        self.rejected = counter(
            "loramux_requests_rejected", "Requests refused at admission, by gRPC status code.", ("reason",)
        )
        self.prompt_tokens = counter("loramux_prompt_tokens", "Prompt tokens of finished requests.")
        self.generated_tokens = counter("loramux_generated_tokens", "Generated tokens of finished requests.")
        self.cache_hits = counter("loramux_adapter_cache_hits", "Adapter found resident in a tier.", ("tier",))
        self.cache_misses = counter("loramux_adapter_cache_misses", "Adapter not resident in a tier.", ("tier",))
        self.cache_evictions = counter("loramux_adapter_cache_evictions", "Adapters evicted from a tier.", ("tier",))
        self.merged_batches = counter("loramux_merged_batches", "Forwards that ran on merged adapter weights.")
        self.merge_decisions = counter("loramux_merge_decisions", "Merged-cache policy decisions.", ("action",))
        self.adapter_requests = counter(
            "loramux_adapter_requests",
            "Finished requests per adapter (bounded: most active N, rest `other`).",
            ("adapter",),
        )
        self.adapter_generated_tokens = counter(
            "loramux_adapter_generated_tokens", "Generated tokens per adapter (same bounded labels).", ("adapter",)
        )

        self.running = gauge("loramux_requests_running", "Requests in the running batch.")
        self.waiting = gauge("loramux_requests_waiting", "Requests queued, not yet admitted.")
        self.adapters_resident = gauge("loramux_adapters_resident", "Adapters resident in a tier.", ("tier",))
        self.adapter_bytes_resident = gauge(
            "loramux_adapter_bytes_resident", "Adapter bytes resident in a tier.", ("tier",)
        )
        self.device_slots_free = gauge("loramux_device_slots_free", "Free adapter slots on the device.")
        self.kv_blocks_used = gauge("loramux_kv_blocks_used", "KV blocks held by running requests.")
        self.kv_blocks_cached = gauge("loramux_kv_blocks_cached", "Idle KV blocks that hold a reusable prefix.")
        self.kv_blocks_total = gauge("loramux_kv_blocks_total", "KV blocks in the pool.")
        self.prefix_queries = counter(
            "loramux_prefix_cache_queries", "Prompt tokens looked up in the prefix cache (first admission)."
        )
        self.prefix_hits = counter("loramux_prefix_cache_hits", "Prompt tokens served from the prefix cache.")
        self.preemptions = counter("loramux_preemptions", "Running requests preempted because KV blocks ran out.")
        self.compiled_forwards = counter(
            "loramux_compiled_forwards",
            "Decode forwards of a compiled engine, by what ran them: compiled, or eager when no graph fit.",
            ("result",),
        )
        for result in ("compiled", "eager"):
            self.compiled_forwards.labels(result)

        self.info = Info("loramux", "Build information.", registry=r)
        self._info: dict[str, str] = {
            "version": _package_version(),
            "python": ".".join(map(str, sys.version_info[:3])),
        }
        self.info.info(self._info)

        for tier in CACHE_TIERS:
            for c in (self.cache_hits, self.cache_misses, self.cache_evictions):
                c.labels(tier)
            self.adapter_load_seconds.labels(tier)
        for tier in RESIDENT_TIERS:
            self.adapters_resident.labels(tier)
            self.adapter_bytes_resident.labels(tier)
        for phase in PHASES:
            self.batch_forward.labels(phase)
            self.batch_size.labels(phase)
        for status in STATUSES:
            self.requests.labels(status)
            for frontend in FRONTENDS:
                self.frontend_requests.labels(frontend, status)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for action in MERGE_ACTIONS:
            self.merge_decisions.labels(action)

        self.adapter_labels = AdapterLabels(max_adapter_labels, adapter_label_half_life_s)
        self._adapter_lock = threading.Lock()
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self._http_lock = threading.Lock()

    # ---- per request ---------------------------------------------------------

    def request_finished(
        self,
        status: str,
        prompt_tokens: int,
        generated_tokens: int,
        queue_s: float | None,
        ttft_s: float | None,
        total_s: float | None,
        adapter_id: str | None,
        frontend: str = "grpc",
    ) -> None:
        """Once per request that ended, whatever the status. A `None` time is not
        observed (e.g. no queue time for a request rejected before queueing, no
        TTFT for one that produced no token). `adapter_id` empty/None = base model.
        `frontend` is the API the request came through (grpc, http)."""
        self.requests.labels(status).inc()
        self.frontend_requests.labels(frontend, status).inc()
        if prompt_tokens > 0:
            self.prompt_tokens.inc(prompt_tokens)
        if queue_s is not None:
            self.request_queue.observe(queue_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if total_s is not None:
            self.request_latency.observe(total_s)
        if generated_tokens > 0:
            self.generated_tokens.inc(generated_tokens)
        with self._adapter_lock:
            label, demoted = self.adapter_labels.label(adapter_id)
            if demoted is not None:
                for c in (self.adapter_requests, self.adapter_generated_tokens):
                    try:
                        c.remove(demoted)
                    except KeyError:  # it never had a series of this counter
                        pass
            self.adapter_requests.labels(label).inc()
            if generated_tokens > 0:
                self.adapter_generated_tokens.labels(label).inc(generated_tokens)

    def request_rejected(self, reason: str, frontend: str = "grpc") -> None:
        """A request refused before it was queued (bad parameters, unknown adapter,
        queue full, draining): counted as status `rejected`, and by `reason` (the
        gRPC code). No tokens and no latencies: it never ran. Not attributed to
        its adapter, so a flood of unknown ids cannot win adapter labels."""
        self.requests.labels("rejected").inc()
        self.frontend_requests.labels(frontend, "rejected").inc()
        self.rejected.labels(reason).inc()

    def token_latency(self, seconds: float) -> None:
        """Time between two consecutive tokens of one request (not the first)."""
        self.inter_token.observe(seconds)

    # ---- scheduler and runner ------------------------------------------------

    def forward(self, phase: str, seconds: float, batch_size: int | None = None) -> None:
        """One model forward; `phase` is `prefill` or `decode`."""
        self.batch_forward.labels(phase).observe(seconds)
        if batch_size is not None:
            self.batch_size.labels(phase).observe(batch_size)

    def set_running(self, n: int) -> None:
        self.running.set(n)

    def set_waiting(self, n: int) -> None:
        self.waiting.set(n)

    def set_kv_blocks(self, used: int, cached: int, total: int) -> None:
        self.kv_blocks_used.set(used)
        self.kv_blocks_cached.set(cached)
        self.kv_blocks_total.set(total)

    def prefix_query(self, tokens: int, hits: int) -> None:
        self.prefix_queries.inc(tokens)
        self.prefix_hits.inc(hits)

    def preempted(self) -> None:
        self.preemptions.inc()

    def compiled_forward(self, result: str) -> None:
        """A decode forward a compiled graph could serve: `compiled`, or `eager` (no graph's guards passed)."""
        self.compiled_forwards.labels(result).inc()

    def merged_batch(self, n: int = 1) -> None:
        self.merged_batches.inc(n)

    # ---- adapter tiers -------------------------------------------------------

    def cache_hit(self, tier: str) -> None:
        self.cache_hits.labels(tier).inc()

    def cache_miss(self, tier: str) -> None:
        self.cache_misses.labels(tier).inc()

    def eviction(self, tier: str) -> None:
        self.cache_evictions.labels(tier).inc()

    def adapter_load(self, tier: str, seconds: float) -> None:
        """Time to bring an adapter into `tier` (store→host read, host→device copy, merge)."""
        self.adapter_load_seconds.labels(tier).observe(seconds)

    def set_resident(self, tier: str, count: int, nbytes: int) -> None:
        self.adapters_resident.labels(tier).set(count)
        self.adapter_bytes_resident.labels(tier).set(nbytes)

    def set_slots_free(self, n: int) -> None:
        self.device_slots_free.set(n)

    def merge_decision(self, action: str) -> None:
        """A merged-cache policy decision: `merge`, `unmerge` or `evict`."""
        self.merge_decisions.labels(action).inc()

    def set_info(self, **labels: str) -> None:
        """Adds build/run information to `loramux_info` (e.g. model=..., device=...)."""
        self._info.update({k: str(v) for k, v in labels.items()})
        self.info.info(self._info)

    # ---- exposition ----------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition of this registry (what /metrics serves)."""
        return generate_latest(self.registry)

    def start_http_server(self, host: str = "0.0.0.0", port: int = 0) -> tuple[WSGIServer, int]:
        """Serves /metrics for this registry from a daemon thread. Port 0 picks a
        free port; the port actually bound is returned."""
        with self._http_lock:
            if self._http is not None:
                raise RuntimeError("metrics HTTP server already started")
            # prometheus_client 0.26 returns (server, thread) and picks the address
            # family from `host`, so "::" works too.
            server, thread = _prom_start_http_server(port, addr=host, registry=self.registry)
            self._http = (server, thread)
            return server, int(server.server_address[1])

    def stop_http_server(self) -> None:
        """Stops the server started by `start_http_server`; a no-op if none."""
        with self._http_lock:
            http, self._http = self._http, None
        if http is None:
            return
        server, thread = http
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
