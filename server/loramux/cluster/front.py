"""The cluster's front: the gRPC contract on one port (and the HTTP API on another,
http_front.py), every call forwarded through Ray.

A thin Ray Serve deployment (one replica, no CPU of its own) runs a gRPC server
with the `Generation` and `Adapters` services, health and reflection. Each call
goes to a replica through the replicas' deployment handle, whose router
(router.py) picks the replica; streams come back through Ray's streaming
handles. Ray Serve's own gRPC proxy is not used because it has no
client-streaming calls, and `UploadAdapter` is one.

Statuses are the replica's own (its server made them). Ray's failures map to the
contract: a replica that dies under a call is `UNAVAILABLE`, a full router queue
(`max_queued_requests`) is `RESOURCE_EXHAUSTED`. The replica that answered is in
the trailing metadata `loramux-replica`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from loramux.api.auth import AdminAuth, AdminAuthInterceptor
from loramux.cluster.config import REPLICA_HEADER, ClusterConfig
from loramux.cluster.failures import ray_status
from loramux.cluster.http_front import create_front_app
from loramux.cluster.replica import Outcome
from loramux.cluster.router_metrics import router_state
from loramux.config import ServerConfig
from loramux.http.frontend import HttpFrontend
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

log = logging.getLogger("loramux.cluster")

MB = 1024 * 1024
SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())


class Forwarder:
    """Calls a replica method through the handle; turns the answer into a reply or an abort."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    @staticmethod
    def metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in (context.invocation_metadata() or ()) if not k.startswith((":", "grpc-"))]

    async def unary(self, context: grpc.aio.ServicerContext, method: str, *args: Any, route_key: str) -> bytes:
        response = self.handle.options(method_name=method).remote(
            *args, self.metadata(context), context.time_remaining(), route_key=route_key
        )
        try:
            outcome: Outcome = await response
        except asyncio.CancelledError:
            response.cancel()  # the client went away: the replica's call is cancelled, its request freed
            raise
        except Exception as e:
            await self.fail(context, e, method)
        return await self.reply(context, outcome)

    async def stream(self, context: grpc.aio.ServicerContext, method: str, *args: Any, route_key: str
                     ) -> AsyncIterator[bytes]:  # fmt: skip
        gen = self.handle.options(method_name=method, stream=True).remote(
            *args, self.metadata(context), context.time_remaining(), route_key=route_key
        )
        try:
            while True:
                try:
                    outcome: Outcome = await gen.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as e:
                    await self.fail(context, e, method)
                yield await self.reply(context, outcome)
        finally:
            gen.cancel()  # a no-op once it ended

    @staticmethod
    async def reply(context: grpc.aio.ServicerContext, outcome: Outcome) -> bytes:
        context.set_trailing_metadata(((REPLICA_HEADER, str(outcome.replica)),))
        if outcome.code != "OK":
            await context.abort(grpc.StatusCode[outcome.code], outcome.details)
        return outcome.message

    @staticmethod
    async def fail(context: grpc.aio.ServicerContext, e: Exception, method: str) -> NoReturn:
        status = ray_status(e)
        if status is None:
            log.error("%s failed in the cluster: %r", method, e)
            status = grpc.StatusCode.INTERNAL, f"{method} failed in the cluster: {type(e).__name__}"
        else:
            log.warning("%s: %s (%r)", method, status[1], e)
        await context.abort(*status)
        raise AssertionError("unreachable: abort raises")


class GenerationFront(pb_grpc.GenerationServicer):
    def __init__(self, forward: Forwarder) -> None:
        self.forward = forward

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        body = await self.forward.unary(context, "generate", request.SerializeToString(), route_key=request.adapter_id)
        return pb.GenerateResponse.FromString(body)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        messages = self.forward.stream(
            context, "generate_stream", request.SerializeToString(), route_key=request.adapter_id
        )
        async for body in messages:
            yield pb.GenerateStreamResponse.FromString(body)


class AdaptersFront(pb_grpc.AdaptersServicer):
    """Every Adapters call goes to the adapter's own replica (a listing: the least loaded).
    Replicas share the store, so a mutation done on one is what every other one reads next."""

    def __init__(self, forward: Forwarder, max_adapter_bytes: int) -> None:
        self.forward, self.max_bytes = forward, max_adapter_bytes

    async def _call(self, context: grpc.aio.ServicerContext, method: str, request: Any, reply: type) -> Any:
        key = getattr(request, "adapter_id", "")
        body = await self.forward.unary(context, "adapters_call", method, request.SerializeToString(), route_key=key)
        return reply.FromString(body)

    async def UploadAdapter(
        self, request_iterator: AsyncIterator[pb.UploadAdapterRequest], context: grpc.aio.ServicerContext
    ) -> pb.Adapter:
        # The front's interceptor refused it already without the admin token (the replica checks again).
        messages: list[bytes] = []
        key, size = "", 0
        async for msg in request_iterator:
            if not messages and msg.WhichOneof("payload") == "manifest":
                key = msg.manifest.adapter_id
            size += len(msg.chunk)
            if size > self.max_bytes:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"adapter {key!r}: the stream passed {self.max_bytes} bytes"
                )
            messages.append(msg.SerializeToString())
        body = await self.forward.unary(context, "upload", messages, route_key=key)
        return pb.Adapter.FromString(body)

    async def GetAdapter(self, request: pb.GetAdapterRequest, context: grpc.aio.ServicerContext) -> pb.Adapter:
        return await self._call(context, "GetAdapter", request, pb.Adapter)

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        return await self._call(context, "ListAdapters", request, pb.ListAdaptersResponse)

    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAdapterResponse:
        return await self._call(context, "DeleteAdapter", request, pb.DeleteAdapterResponse)

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.Adapter:
        return await self._call(context, "LoadAdapter", request, pb.Adapter)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.Adapter:
        return await self._call(context, "UnloadAdapter", request, pb.Adapter)


class Front:
    """The Ray Serve deployment class of the front (app.py makes it the ingress)."""

    async def __init__(self, replicas: Any, config: ServerConfig, cluster: ClusterConfig) -> None:
        self.config, self.cluster = config, cluster
        self.state = router_state(cluster.replica_deployment)
        msg = config.max_message_mb * MB
        # The same interceptor as one server's: no upload is buffered here without the admin token.
        self.grpc = grpc.aio.server(
            options=[("grpc.max_receive_message_length", msg), ("grpc.max_send_message_length", msg)],
            interceptors=[AdminAuthInterceptor(AdminAuth.from_file(config.admin_token_file))],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        forward = Forwarder(replicas)
        pb_grpc.add_GenerationServicer_to_server(GenerationFront(forward), self.grpc)
        pb_grpc.add_AdaptersServicer_to_server(AdaptersFront(forward, int(config.max_adapter_mb * MB)), self.grpc)
        reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, health.SERVICE_NAME), self.grpc)
        address = f"{config.host}:{config.port}"
        if config.tls_cert is not None:
            creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            self.port = self.grpc.add_secure_port(address, creds)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        self.metrics_host = config.metrics_host or config.host
        self._metrics_http, _ = start_http_server(config.metrics_port, addr=self.metrics_host,
                                                  registry=self.state.registry)  # fmt: skip
        self.metrics_port = int(self._metrics_http.server_address[1])
        await replicas.info.remote()  # the first call starts the handle's router, and so its view of the replicas
        self.http: HttpFrontend | None = None
        self.http_port = 0
        if config.http_port >= 0:
            self.http = HttpFrontend(create_front_app(replicas, self.served_name), config.host, config.http_port)
            self.http_port = await self.http.start()
        await self.grpc.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("cluster front: grpc on %s:%d, router metrics on %s:%d", config.host, self.port,
                 self.metrics_host, self.metrics_port)  # fmt: skip

    def addresses(self) -> dict[str, str]:
        """Where the front listens: `grpc`, `metrics` and (unless --http-port -1) `http`."""
        out = {"grpc": f"{self.config.host}:{self.port}", "metrics": f"{self.metrics_host}:{self.metrics_port}"}
        if self.http is not None:
            out["http"] = f"{self.config.host}:{self.http_port}"
        return out

    def served_name(self) -> str:
        """The base model's id over HTTP, as the replicas serve it (the same config: the same name)."""
        for m in self.state.replicas.values():
            if m.get("served_model_name"):
                return str(m["served_model_name"])
        return self.config.served_model_name

    def replicas(self) -> list[dict[str, Any]]:
        """What the router knows of each live replica (rank, metrics address, pid), by rank."""
        return sorted(self.state.replicas.values(), key=lambda m: m.get("rank", -1))

    async def __del__(self) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.http is not None:
            await self.http.stop(self.config.drain_timeout)
        await self.grpc.stop(self.config.drain_timeout)
        self._metrics_http.shutdown()
        self._metrics_http.server_close()
