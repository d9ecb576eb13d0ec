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

from loramux.adapters.cache import AdapterCache
from loramux.adapters.loader import parse_adapter
from loramux.adapters.store import AdapterStore
from loramux.adapters.wrapped import WrappedModel
from loramux.api.generation import GenerationService
from loramux.config import ServerConfig
from loramux.engine.engine import Engine
from loramux.metrics import Metrics
from loramux.model import BaseModel, load_base_model
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
        self.metrics: Metrics | None = None
        self._metrics_http = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        cfg = self.config
        msg = cfg.max_message_mb * 1024 * 1024
        self.grpc = grpc.aio.server(
            options=[("grpc.max_receive_message_length", msg), ("grpc.max_send_message_length", msg)]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.generation = GenerationService()
        pb_grpc.add_GenerationServicer_to_server(self.generation, self.grpc)
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
        self.metrics = Metrics(max_adapter_labels=cfg.metrics_max_adapter_labels)
        metrics_host = cfg.metrics_host or cfg.host
        _, self.metrics_port = self.metrics.start_http_server(metrics_host, cfg.metrics_port)
        print(f"metrics listening on {metrics_host}:{self.metrics_port}", flush=True)

        loop = asyncio.get_running_loop()
        self.base = await loop.run_in_executor(None, load_base_model, cfg.model, cfg.device, cfg.dtype)
        wrapped = WrappedModel(self.base.model, cfg.engine.max_device_adapters)
        self.wrapped = wrapped
        self.store = AdapterStore(cfg.store)
        await loop.run_in_executor(None, self.store.scan, self.validate_adapter)
        e = cfg.engine
        self.cache = AdapterCache(
            wrapped, self.store, int(e.host_cache_mb * MB), self.metrics,
            merged_cache_bytes=int(e.merged_cache_mb * MB), merge_threshold=e.merge_threshold,
            merge_window_tokens=e.merge_window_tokens,
        )
        self.engine = Engine(self.base, wrapped, cfg.engine, adapters=self.cache, metrics=self.metrics)
        self.cache.on_ready = self.engine.wake
        self.metrics.set_info(model=self.base.name, device=str(self.base.device), dtype=str(self.base.dtype))
        self.generation.attach(self.engine, self.store.exists)
        self.engine.start()
        await loop.run_in_executor(None, self._warm_up)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        b = self.base
        log.info("serving %s on %s (%s) at %s:%d", b.name, b.device, b.dtype, cfg.host, self.port)

    def validate_adapter(self, config: dict, weights_path: Path) -> str:
        """Parse an adapter against the base model (every check loading does); returns its type."""
        return parse_adapter(config, weights_path, self.wrapped).info.adapter_type

    def _warm_up(self) -> None:
        """One real forward before SERVING, so the first client does not pay for lazy set-up."""
        from loramux.engine.request import Request, SamplingParams

        req = Request("warmup", [1, 2, 3], SamplingParams(max_new_tokens=2))
        finished: list[bool] = []
        req.sink = lambda ev: finished.append(True) if ev.final else None
        self.engine.validate(req)
        self.engine.submit(req)
        deadline = time.monotonic() + 120
        while not finished and time.monotonic() < deadline:
            time.sleep(0.01)

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def drain(self) -> None:
        """Stop admitting, let running requests and streams finish (bounded), then stop."""
        if self._stopped.is_set():
            return
        log.info("draining: no new requests; waiting up to %.0fs for running ones", self.config.drain_timeout)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.engine is not None:
            self.engine.stop_admitting()
            deadline = time.monotonic() + self.config.drain_timeout
            while not self.engine.idle and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        await self.stop(grace=min(5.0, self.config.drain_timeout))

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        if self.grpc is not None:
            await self.grpc.stop(grace)
        if self.engine is not None:
            self.engine.shutdown()
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
