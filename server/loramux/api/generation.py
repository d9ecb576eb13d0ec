"""The Generation service: unary and streaming generate over the engine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import grpc

from loramux.api.bridge import EventBridge
from loramux.api.errors import status_for
from loramux.api.requests import Prompts, RequestCancelled, admit, events
from loramux.engine.engine import Engine
from loramux.engine.request import Request, TokenEvent
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

log = logging.getLogger("loramux.api")
FRONTEND = "grpc"


class GenerationService(pb_grpc.GenerationServicer):
    """Registered before the server starts; serves once `attach` gives it the engine."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.prompts: Prompts | None = None
        self.adapter_exists: Callable[[str], bool] = lambda _id: False

    def attach(self, engine: Engine, adapter_exists: Callable[[str], bool], bridge: EventBridge) -> None:
        self.bridge = bridge
        self.tokenizer = engine.base.tokenizer
        self.prompts = Prompts(self.tokenizer, engine.max_len)
        self.adapter_exists = adapter_exists
        self.engine = engine

    def close(self) -> None:
        """Stop the tokenizer thread (the server's stop)."""
        if self.prompts is not None:
            self.prompts.close()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        req, queue = await self._admit(request, context)
        ids: list[int] = []
        logprobs: list[float] = []
        text: list[str] = []
        async for ev in self._events(req, queue, context):
            ids.extend(ev.token_ids)
            logprobs.extend(ev.logprobs)
            text.append(ev.text)
            if ev.final:
                return pb.GenerateResponse(
                    request_id=req.request_id,
                    text="".join(text),
                    token_ids=ids,
                    finish_reason=int(ev.finish_reason),
                    prompt_tokens=req.prompt_len,
                    generated_tokens=len(ids),
                    logprobs=logprobs,
                    adapter_id=req.adapter_id,
                    cached_tokens=max(req.cached_tokens, 0),
                )
        raise AssertionError("unreachable: the event stream ends with a final event")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        req, queue = await self._admit(request, context)
        n = 0
        async for ev in self._events(req, queue, context):
            first = n == 0
            n += len(ev.token_ids)
            yield pb.GenerateStreamResponse(
                request_id=req.request_id,
                text=ev.text,
                token_ids=ev.token_ids,
                finish_reason=int(ev.finish_reason),
                prompt_tokens=req.prompt_len,
                generated_tokens=n,
                cached_tokens=max(req.cached_tokens, 0) if first else 0,  # set on the first message
            )

    # --- helpers ---
    async def _admit(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[Request, asyncio.Queue[TokenEvent]]:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            return await admit(self.engine, request, self.prompts, self.adapter_exists, deadline, FRONTEND, self.bridge)
        except Exception as e:  # Draining is UNAVAILABLE, like any status, through status_for
            await context.abort(status_for(e), str(e))
            raise AssertionError("unreachable: abort raises") from e

    async def _events(
        self, req: Request, queue: asyncio.Queue[TokenEvent], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[TokenEvent]:
        """The request's token events, in order; cancels the request if the client goes away."""
        try:
            async with aclosing(events(self.engine, req, queue)) as stream:
                async for ev in stream:
                    yield ev
        except RequestCancelled:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request cancelled or past its deadline")
        except Exception as e:
            code = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.error("request %s failed: %r", req.request_id, e)
            await context.abort(code, f"request {req.request_id}: {e}")
