"""Undecodable request messages answer INVALID_ARGUMENT, not gRPC's UNKNOWN.

A message that protobuf cannot parse (most often a `string` field that is not
valid UTF-8, e.g. a prompt of raw bytes) makes the stock deserializer raise, and
grpc answers UNKNOWN. This interceptor wraps every method's deserializer: a
failure becomes a marker that the wrapped handler refuses with INVALID_ARGUMENT
before any servicer code sees it. Streams of requests (uploads) are refused at
the message that fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

__all__ = ["DecodeErrors", "UndecodableMessage"]


class UndecodableMessage(ValueError):
    """A request message that does not parse (INVALID_ARGUMENT)."""


class _Undecodable:
    def __init__(self, error: Exception) -> None:
        self.message = f"the request message does not parse (is every string valid UTF-8?): {error}"


def _safe(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as e:  # protobuf's DecodeError, a UnicodeDecodeError, ...
            return _Undecodable(e)

    return parse


class DecodeErrors(grpc.aio.ServerInterceptor):
    """`on_refused(method)` is told of each refusal (the server counts Generation's as rejected)."""

    def __init__(self, on_refused: Callable[[str], None] = lambda method: None) -> None:
        self.on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = details.method
        refuse = self._refuse
        safe = _safe(handler.request_deserializer)
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await refuse(method, request, context)
                return await inner_uu(request, context)

            return handler._replace(request_deserializer=safe, unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):  # (grpc wants an async generator function here)
                    await refuse(method, request, context)
                async for response in inner_us(request, context):
                    yield response

            return handler._replace(request_deserializer=safe, unary_stream=unary_stream)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_su(_checked(requests), context)
                except UndecodableMessage as e:  # raised where the servicer did not catch it
                    self.on_refused(method)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

            return handler._replace(request_deserializer=safe, stream_unary=stream_unary)
        return handler  # stream-stream: loramux has none

    async def _refuse(self, method: str, bad: _Undecodable, context: grpc.aio.ServicerContext) -> None:
        self.on_refused(method)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for message in requests:
        if isinstance(message, _Undecodable):
            raise UndecodableMessage(message.message)
        yield message
