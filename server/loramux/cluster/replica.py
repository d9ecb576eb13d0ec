"""One replica of the cluster: a whole loramux server inside a Ray Serve replica.

The replica runs the same `LoramuxServer` as `loramux serve` (engine, store,
cache tiers, its own `/metrics`), its gRPC port bound to loopback. The front
calls the methods below through a Ray Serve handle; each forwards the call, as
serialised protobuf, to the replica's own server, so that every check, status
and metric is exactly a single server's. The answer comes back as an `Outcome`
(a status, never a raised exception: nothing of gRPC has to survive pickling).

The store is shared by every replica. A replica's records change only through
its own uploads and deletes, so each call that names an adapter (and a listing)
first re-reads that adapter's directory if another replica changed it; the
cache then drops copies of weights that are no longer current.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

import grpc
import httpx

from loramux.config import ServerConfig
from loramux.http.errors import error_body
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

log = logging.getLogger("loramux.cluster")

Metadata = Sequence[tuple[str, str]]

# Unary Adapters RPCs: name -> request type. UploadAdapter streams and has its own method.
ADAPTER_RPCS: dict[str, type] = {
    "GetAdapter": pb.GetAdapterRequest,
    "ListAdapters": pb.ListAdaptersRequest,
    "DeleteAdapter": pb.DeleteAdapterRequest,
    "LoadAdapter": pb.LoadAdapterRequest,
    "UnloadAdapter": pb.UnloadAdapterRequest,
}


class Outcome(NamedTuple):
    """One answer (or one stream message) from a replica: `code` "OK" with a serialised
    message, or a gRPC status name and its details."""

    replica: int
    code: str
    message: bytes = b""
    details: str = ""


class ReplicaServer:
    """The Ray Serve deployment class of one replica (app.py makes it a deployment)."""

    async def __init__(self, config: ServerConfig) -> None:
        from ray import serve

        from loramux.api.server import LoramuxServer

        # config.threads is this replica's own count already (app.py); its server applies it.
        self.rank = int(serve.get_replica_context().rank.rank)
        metrics_host = config.metrics_host or config.host
        # Its gRPC and HTTP ports on loopback, picked free: only this process's forwarding reaches them.
        local = dataclasses.replace(
            config, host="127.0.0.1", port=0, http_port=0 if config.http_port >= 0 else -1,
            metrics_host=metrics_host, metrics_port=0, tls_cert=None, tls_key=None,
        )  # fmt: skip
        self.server = LoramuxServer(local)
        await self.server.start()
        self.metrics_address = f"{_reachable(metrics_host)}:{self.server.metrics_port}"
        msg = config.max_message_mb * 1024 * 1024
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.server.port}",
            options=[("grpc.max_receive_message_length", msg), ("grpc.max_send_message_length", msg)],
        )
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.http: httpx.AsyncClient | None = None
        if self.server.http_port:
            # No read timeout: a stream lasts as long as its generation (deadlines are the server's).
            self.http = httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{self.server.http_port}",
                timeout=httpx.Timeout(None, connect=30.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
        log.info("replica %d serving; metrics on %s", self.rank, self.metrics_address)

    # ---- Ray Serve hooks ---------------------------------------------------------

    def record_replica_metadata(self) -> dict[str, Any]:
        """Static facts the router (and so the front and `loramux cluster`) reads."""
        return {
            "rank": self.rank, "metrics": self.metrics_address, "pid": os.getpid(),
            "served_model_name": self.server.http_state.served_name,
        }  # fmt: skip

    async def check_health(self) -> None:
        if self.server.engine is None or self.server._stopped.is_set():
            raise RuntimeError("the replica's engine is not running")

    async def __del__(self) -> None:  # Ray Serve calls it on a graceful shutdown
        await self.server.drain()
        if self.http is not None:
            await self.http.aclose()

    # ---- what the front calls (route_key is read by the router only) -------------

    async def generate(self, request: bytes, metadata: Metadata, timeout: float | None, route_key: str = "") -> Outcome:
        req = pb.GenerateRequest.FromString(request)
        await self._sync(req.adapter_id)
        return await self._unary(self.generation.Generate, req, metadata, timeout)

    async def generate_stream(
        self, request: bytes, metadata: Metadata, timeout: float | None, route_key: str = ""
    ) -> AsyncIterator[Outcome]:
        req = pb.GenerateRequest.FromString(request)
        await self._sync(req.adapter_id)
        call = self.generation.GenerateStream(req, metadata=metadata, timeout=timeout)
        try:
            async for msg in call:
                yield Outcome(self.rank, "OK", msg.SerializeToString())
        except grpc.aio.AioRpcError as e:
            yield Outcome(self.rank, e.code().name, details=e.details() or "")
        finally:
            call.cancel()  # a no-op once finished; frees the request when the front went away

    async def adapters_call(
        self, method: str, request: bytes, metadata: Metadata, timeout: float | None, route_key: str = ""
    ) -> Outcome:
        req = ADAPTER_RPCS[method].FromString(request)
        if method == "ListAdapters":
            await asyncio.get_running_loop().run_in_executor(None, self._refresh_all)
        else:
            await self._sync(req.adapter_id)
        return await self._unary(getattr(self.adapters, method), req, metadata, timeout)

    async def upload(
        self, messages: list[bytes], metadata: Metadata, timeout: float | None, route_key: str = ""
    ) -> Outcome:
        reqs = [pb.UploadAdapterRequest.FromString(m) for m in messages]
        if reqs and reqs[0].WhichOneof("payload") == "manifest":
            await self._sync(reqs[0].manifest.adapter_id)
        return await self._unary(self.adapters.UploadAdapter, iter(reqs), metadata, timeout)

    async def http_call(
        self, method: str, target: str, headers: Metadata, body: bytes, route_key: str = ""
    ) -> AsyncIterator[tuple[int, int, list[tuple[str, str]]] | bytes]:
        """One HTTP request to this replica's own OpenAI-compatible server: first (rank, status,
        headers), then the body in the chunks the server wrote (each SSE event as it is made)."""
        if self.http is None:
            raise RuntimeError("the cluster runs without its HTTP API (--http-port -1)")
        if target.startswith("/v1/models"):
            await asyncio.get_running_loop().run_in_executor(None, self._refresh_all)
        else:
            await self._sync(route_key)
        try:
            response = await self.http.send(self.http.build_request(method, target, headers=headers, content=body),
                                            stream=True)  # fmt: skip
        except httpx.TransportError as e:  # its server stopped (the replica is draining)
            yield self.rank, 503, [("content-type", "application/json")]
            body = error_body(f"replica {self.rank} is not serving: {e!r}", grpc.StatusCode.UNAVAILABLE)
            yield json.dumps(body).encode()
            return
        try:
            yield self.rank, response.status_code, list(response.headers.items())
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()  # early, when the front went away: the server sees the disconnect

    def info(self) -> dict[str, Any]:
        return self.record_replica_metadata()

    # ---- helpers ---------------------------------------------------------------

    async def _unary(self, rpc: Any, req: Any, metadata: Metadata, timeout: float | None) -> Outcome:
        try:
            reply = await rpc(req, metadata=metadata, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            return Outcome(self.rank, e.code().name, details=e.details() or "")
        return Outcome(self.rank, "OK", reply.SerializeToString())

    async def _sync(self, adapter_id: str) -> None:
        """Make another replica's upload, overwrite or delete of `adapter_id` visible here."""
        if adapter_id:
            await asyncio.get_running_loop().run_in_executor(None, self._refresh, adapter_id)

    def _refresh(self, adapter_id: str) -> None:
        store, engine = self.server.store, self.server.engine
        try:
            before = store.get(adapter_id).sha256
        except (KeyError, ValueError):  # unknown here, or not a valid id (the server says which)
            before = None
        try:
            after = store.refresh(adapter_id)
        except ValueError:  # an invalid id: the server answers INVALID_ARGUMENT itself
            return
        if before is not None and (after is None or after.sha256 != before):
            # Keys carry the sha256, so old weights are never served; this frees their memory.
            engine.call(lambda: self.server.cache.forget(adapter_id)).result()

    def _refresh_all(self) -> None:
        store = self.server.store
        before = {r.adapter_id: r.sha256 for r in store.list()}
        after = {r.adapter_id: r.sha256 for r in store.refresh_all()}
        for adapter_id in [a for a, sha in before.items() if after.get(a) != sha]:
            self.server.engine.call(lambda a=adapter_id: self.server.cache.forget(a)).result()


def _reachable(host: str) -> str:
    """The address another machine reaches a server bound to `host` at."""
    if host in ("0.0.0.0", "::", ""):
        import ray

        return ray.util.get_node_ip_address()
    return host
