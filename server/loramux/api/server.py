"""The gRPC server: wires the model, the engine, the services, health, reflection and metrics."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loramux.adapters.cache.adapter_cache import AdapterCache
from loramux.adapters.formats.loader import parse_adapter
from loramux.adapters.kinds.base import AdapterInfo
from loramux.adapters.model.wrapped import WrappedModel
from loramux.adapters.store.store import AdapterStore
from loramux.api.adapters import AdaptersService
from loramux.api.auth import AdminAuth
from loramux.api.bridge import EventBridge
from loramux.api.decode import DecodeErrors
from loramux.api.errors import status_for
from loramux.api.generation import GenerationService
from loramux.config import ServerConfig
from loramux.engine.engine import Engine
from loramux.http.app import HttpState, create_app, read_key
from loramux.http.frontend import HttpFrontend
from loramux.metrics import Metrics
from loramux.model import BaseModel, load_base_model
from loramux.threads import apply_threads
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

log = logging.getLogger("loramux.server")

MB = 1024 * 1024
SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Generation"].full_name,
    pb.DESCRIPTOR.services_by_name["Adapters"].full_name,
)


class LoramuxServer:
    """One server process: `await start()`, then `await wait()` until drained or stopped."""

    def __init__(self, config: ServerConfig) -> None:
        config.validate()
        self.config = config
        self.base: BaseModel | None = None
        self.engine: Engine | None = None
        self.store: AdapterStore | None = None
        self.cache: AdapterCache | None = None
        self.grpc: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self.http: HttpFrontend | None = None
        self.generation: GenerationService | None = None  # the front-ends' state, made in `start`
        self.http_state: HttpState | None = None
        self.http_port = 0
        self.metrics: Metrics | None = None
        self._metrics_http = None
        self._stopped = asyncio.Event()
        self._draining = False
        self._force = False  # a second stop signal: stop waiting for running requests

    async def start(self) -> None:
        cfg = self.config
        msg = cfg.max_message_mb * 1024 * 1024
        self.adapters = AdaptersService(AdminAuth.from_file(cfg.admin_token_file), int(cfg.max_adapter_mb * MB))
        self.grpc = grpc.aio.server(
            interceptors=[DecodeErrors(self._undecodable), self.adapters.interceptor()],
            options=[("grpc.max_receive_message_length", msg), ("grpc.max_send_message_length", msg)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.generation = GenerationService()
        pb_grpc.add_GenerationServicer_to_server(self.generation, self.grpc)
        pb_grpc.add_AdaptersServicer_to_server(self.adapters, self.grpc)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, health.SERVICE_NAME), self.grpc)
        # Health answers NOT_SERVING while the model loads: bind first, load after.
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert is not None:
            creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
            self.port = self.grpc.add_secure_port(address, creds)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        await self.grpc.start()
        print(f"grpc listening on {cfg.host}:{self.port}", flush=True)
        self.http_state = HttpState(read_key(cfg.api_key_file), self.adapters.auth, cfg.served_model_name)
        if cfg.http_port >= 0:  # the OpenAI-compatible API, on this loop, over the same engine
            self.http = HttpFrontend(create_app(self.http_state), cfg.host, cfg.http_port)
            self.http_port = await self.http.start()
            print(f"http listening on {cfg.host}:{self.http_port}", flush=True)
        self.metrics = Metrics(max_adapter_labels=cfg.metrics_max_adapter_labels)
        metrics_host = cfg.metrics_host or cfg.host
        _, self.metrics_port = self.metrics.start_http_server(metrics_host, cfg.metrics_port)
        print(f"metrics listening on {metrics_host}:{self.metrics_port}", flush=True)

        loop = asyncio.get_running_loop()
        self.threads = apply_threads(cfg.threads)
        self.base = await loop.run_in_executor(None, load_base_model, cfg.model, cfg.device, cfg.dtype)
        wrapped = WrappedModel(self.base.model, cfg.engine.max_device_adapters)
        self.wrapped = wrapped
        self.store = AdapterStore(cfg.store)
        await loop.run_in_executor(None, self.store.scan, self.validate_adapter)
        e = cfg.engine
        self.cache = AdapterCache(
            wrapped,
            self.store,
            int(e.host_cache_mb * MB),
            self.metrics,
            merged_cache_bytes=int(e.merged_cache_mb * MB),
            merge_threshold=e.merge_threshold,
            merge_window_tokens=e.merge_window_tokens,
        )
        self.engine = Engine(self.base, wrapped, cfg.engine, adapters=self.cache, metrics=self.metrics)
        self.cache.on_ready = self.engine.wake
        self.engine.outcomes.refusal_reason = lambda err: status_for(err).name.lower()
        self.metrics.set_info(model=self.base.name, device=str(self.base.device), dtype=str(self.base.dtype))
        bridge = EventBridge(loop)  # the engine's events to both front-ends' requests, a step's at once
        self.generation.attach(self.engine, self.store.exists, bridge)
        self.adapters.attach(self.store, self.cache, self.engine, self.describe_adapter)
        # A model the engine cannot serve exactly is never served: this raises, and serve exits non-zero.
        await loop.run_in_executor(None, self.engine.self_check)
        await loop.run_in_executor(None, self.engine.compile)
        self.http_state.attach(self.engine, self.adapters, cfg.allowed_adapter_dir, bridge)
        self.engine.start()
        await loop.run_in_executor(None, self._warm_up)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.http_state.serving = True
        b = self.base
        log.info("serving %s on %s (%s) at %s:%d", b.name, b.device, b.dtype, cfg.host, self.port)

    def _undecodable(self, method: str) -> None:
        """A Generation request that did not parse counts as rejected (invalid_argument), like any refusal."""
        if self.metrics is not None and method.startswith(f"/{SERVICE_NAMES[0]}/"):
            self.metrics.request_rejected("invalid_argument")

    def validate_adapter(self, config: dict, weights_path: Path) -> str:
        """Parse an adapter against the base model (every check loading does); returns its type."""
        return self.describe_adapter(config, weights_path).adapter_type

    def describe_adapter(self, config: dict, weights_path: Path) -> AdapterInfo:
        """Like validate_adapter, but the whole AdapterInfo (type, rank, targets) for the Adapters API."""
        return parse_adapter(config, weights_path, self.wrapped).info

    def _warm_up(self) -> None:
        """One real forward before SERVING, so the first client does not pay for lazy set-up."""
        from loramux.engine.request import Request, SamplingParams

        req = Request("warmup", [1, 2, 3], SamplingParams(max_new_tokens=2))
        finished: list[bool] = []
        req.sink = lambda ev: finished.append(True) if ev.final else None
        self.engine.quiet.add(req)  # not client traffic: kept out of metrics and request logs
        self.engine.validate(req)
        self.engine.submit(req)
        deadline = time.monotonic() + 120
        while not finished and time.monotonic() < deadline:
            time.sleep(0.01)

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def drain(self) -> None:
        """Stop admitting, let running requests and streams finish (bounded), then stop.

        The gRPC port stays open while the engine drains, so a new request gets a
        clear UNAVAILABLE ("draining") rather than a refused connection, and the
        running streams keep sending. A second call (a second SIGTERM/SIGINT)
        ends the wait for running requests at once."""
        if self._stopped.is_set():
            return
        if self._draining:
            log.warning("second stop signal: not waiting for running requests")
            self._force = True
            return
        self._draining = True
        timeout = self.config.drain_timeout
        deadline = time.monotonic() + timeout
        # Refuse new work first, synchronously, so that once health reads
        # NOT_SERVING, every later request is refused.
        if self.engine is not None:
            self.engine.stop_admitting()
        self.adapters.draining = True
        self.http_state.serving = False
        log.info("draining: no new requests; waiting up to %.0fs for running ones", timeout)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.engine is not None:
            while not self.engine.idle and time.monotonic() < deadline and not self._force:
                await asyncio.sleep(0.02)
            if not self.engine.idle:
                log.warning(
                    "drain cut short: %d running and %d waiting requests fail",
                    self.engine.num_running,
                    self.engine.num_waiting,
                )
        # What is left of the budget goes to RPCs still in flight: streams sending
        # their last messages, uploads (which clean up when cancelled). stop()
        # returns as soon as they are done, so a long grace costs nothing.
        grace = 0.0 if self._force else max(deadline - time.monotonic(), min(1.0, timeout))
        await self.stop(grace=grace)
        log.info("drained and stopped")

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        if self.http is not None:
            await self.http.stop(grace)
        if self.grpc is not None:
            await self.grpc.stop(grace)
        if self.engine is not None:
            self.engine.shutdown()
        for front in (self.generation, self.http_state):
            if front is not None:
                front.close()  # their tokenizer threads
        if self.cache is not None:
            self.cache.close()
        if self.metrics is not None:
            self.metrics.stop_http_server()
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(config: ServerConfig) -> int:
    """Run a server until SIGTERM/SIGINT, then drain and return the exit code."""
    server = LoramuxServer(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.drain()))
    try:
        await server.start()
    except Exception as e:
        print(f"loramux: failed to start: {e}", file=sys.stderr, flush=True)
        await server.stop(0)
        return 1
    await server.wait()
    return 0
