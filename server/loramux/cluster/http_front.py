"""The cluster's HTTP ingress: the OpenAI-compatible API on one port, every call forwarded through Ray.

The routes are not written twice. Each replica serves the very app of
`loramux.http` (on its own loopback port, over its own engine); the front is a
pass-through that reads only what routing needs, the `model` of a generation
(or the `lora_name` of a load / unload), and sends the raw request through the
replicas' deployment handle, so the same router (router.py) that places gRPC
calls picks the replica. The replica answers with the head (status, headers)
and then the body in the chunks its server wrote, so server-sent events stream
through as they are made.

Every status, error body, key check and metric is therefore a single server's.
Ray's own failures map like the gRPC front's (failures.py): before the response
has started they get OpenAI's error body with 503 / 429; after, a stream gets
one error event and ends. A client that goes away cancels the replica's call,
whose own server then cancels the request (counted `cancelled`). The replica
that answered is in the `loramux-replica` header.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from loramux.cluster.config import REPLICA_HEADER
from loramux.cluster.failures import ray_status
from loramux.http.errors import HttpError, error_body, error_response
from loramux.http.generate import disconnected, sse

log = logging.getLogger("loramux.cluster")

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
# The body field that names the adapter a POST is about (its routing key).
ROUTE_FIELDS = {
    "/v1/completions": "model",
    "/v1/chat/completions": "model",
    "/v1/load_lora_adapter": "lora_name",
    "/v1/unload_lora_adapter": "lora_name",
}
# Hop-by-hop headers (RFC 9110 7.6.1) and the framing each side sets itself.
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host",
     "content-length", "date", "server"}
)  # fmt: skip
CLIENT_GONE = 499  # nginx's status for a client that closed the connection; nobody reads it


def route_key(method: str, path: str, body: bytes, served_name: str) -> str:
    """The adapter id a request is about ("" = none: the base model, listings, health)."""
    field = ROUTE_FIELDS.get(path) if method == "POST" else None
    if field is None:
        return ""
    try:
        value = json.loads(body).get(field)
    except (ValueError, AttributeError):  # not a JSON object: the replica answers the 400
        return ""
    return value if isinstance(value, str) and value != served_name else ""


def forwarded_headers(headers: Any) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_HEADERS]


def create_front_app(handle: Any, served_name: Callable[[], str]) -> Starlette:
    """The front's app: every path forwarded to the replica the router picks."""

    async def forward(http: Request) -> Response:
        body = await http.body()
        target = http.url.path + (f"?{http.url.query}" if http.url.query else "")
        key = route_key(http.method, http.url.path, body, served_name())
        gen = handle.options(method_name="http_call", stream=True).remote(
            http.method, target, forwarded_headers(http.headers), body, route_key=key
        )
        watch = asyncio.ensure_future(disconnected(http))
        watch.add_done_callback(lambda f: f.cancelled() or gen.cancel())  # the client left: so does the call
        try:
            rank, status, headers = await gen.__anext__()
        except Exception as e:
            gone = watch.done()
            watch.cancel()
            gen.cancel()
            return Response(status_code=CLIENT_GONE) if gone else error_response(_as_http_error(e, http.url.path))
        except BaseException:
            watch.cancel()
            gen.cancel()
            raise
        events = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers)

        async def body_chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    try:
                        chunk = await gen.__anext__()
                    except StopAsyncIteration:
                        return
                    except Exception as e:
                        if watch.done():  # cancelled because the client left
                            return
                        err = _as_http_error(e, http.url.path)
                        if events:  # the response has started: the error goes out as an event
                            yield sse(error_body(str(err), err.code)).encode()
                        return
                    yield chunk
            finally:
                watch.cancel()
                gen.cancel()  # a no-op once it ended

        out = {k: v for k, v in headers if k.lower() not in HOP_HEADERS}
        out[REPLICA_HEADER] = str(rank)
        return StreamingResponse(body_chunks(), status_code=status, headers=out)

    return Starlette(routes=[Route("/{path:path}", forward, methods=METHODS)])


def _as_http_error(e: Exception, path: str) -> HttpError:
    status = ray_status(e)
    if status is None:
        log.error("HTTP %s failed in the cluster: %r", path, e)
        return HttpError(grpc.StatusCode.INTERNAL, f"{path} failed in the cluster: {type(e).__name__}")
    log.warning("HTTP %s: %s (%r)", path, status[1], e)
    return HttpError(*status)
