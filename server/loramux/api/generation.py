"""The Generation service: unary and streaming generate over the engine."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from loramux.api.errors import NotFound, status_for
from loramux.engine.engine import Engine
from loramux.engine.request import Request, SamplingParams, TokenEvent
from loramux.logs import log_request
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

log = logging.getLogger("loramux.api")


class GenerationService(pb_grpc.GenerationServicer):
    """Registered before the server starts; serves once `attach` gives it the engine."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.adapter_exists: Callable[[str], bool] = lambda _id: False

    def attach(self, engine: Engine, adapter_exists: Callable[[str], bool]) -> None:
        self.tokenizer = engine.base.tokenizer
        self.adapter_exists = adapter_exists
        self.engine = engine

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
                )
        raise AssertionError("unreachable: the event stream ends with a final event")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        req, queue = await self._admit(request, context)
        n = 0
        async for ev in self._events(req, queue, context):
            n += len(ev.token_ids)
            yield pb.GenerateStreamResponse(
                request_id=req.request_id,
                text=ev.text,
                token_ids=ev.token_ids,
                finish_reason=int(ev.finish_reason),
                prompt_tokens=req.prompt_len,
                generated_tokens=n,
            )

    # --- helpers ---
    async def _admit(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[Request, asyncio.Queue[TokenEvent]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        req: Request | None = None
        try:
            req = self._build(request, context)
            self.engine.validate(req)
            # The sink is set before submit: the engine may step before this coroutine resumes.
            req.sink = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
            self.engine.submit(req)
        except Exception as e:  # Draining is UNAVAILABLE, like any status, through status_for
            code = status_for(e)
            self._rejected(request, req, code, e)
            await context.abort(code, str(e))
        return req, queue

    def _rejected(self, request: pb.GenerateRequest, req: Request | None, code: grpc.StatusCode,
                  err: BaseException) -> None:
        """A request refused at admission still gets its metrics count and its log
        line (status `rejected`), so operators see refusals, not only successes."""
        if self.engine is not None and self.engine.metrics is not None:
            self.engine.metrics.request_rejected(code.name.lower())
        log_request(
            {
                "request_id": req.request_id if req is not None else request.request_id or None,
                "adapter_id": request.adapter_id,
                "status": "rejected",
                "prompt_tokens": req.prompt_len if req is not None else None,
                "generated_tokens": 0,
                "code": code.name,
                "error": str(err),
            }
        )

    def _build(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Request:
        has_text, has_ids = bool(request.prompt), len(request.prompt_token_ids) > 0
        if has_text == has_ids:
            raise ValueError("set exactly one of prompt and prompt_token_ids")
        if request.adapter_id and not self.adapter_exists(request.adapter_id):
            raise NotFound(f"unknown adapter {request.adapter_id!r}")
        if has_text:
            prompt_ids = list(self.tokenizer(request.prompt).input_ids)
        else:
            prompt_ids = list(request.prompt_token_ids)
        p = request.params
        # proto3 sends 0 for an unset float: only an exact 0 means "off"; NaN, negative or
        # out-of-range values go on to validation and are refused there, never taken as off.
        params = SamplingParams(
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            top_p=1.0 if p.top_p == 0 else p.top_p,
            top_k=p.top_k,
            seed=p.seed if p.HasField("seed") else None,
            stop=tuple(p.stop),
            repetition_penalty=1.0 if p.repetition_penalty == 0 else p.repetition_penalty,
            ignore_eos=p.ignore_eos,
            min_p=p.min_p,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
        )
        remaining = context.time_remaining()
        return Request(
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            params=params,
            adapter_id=request.adapter_id,
            return_logprobs=request.return_logprobs,
            deadline=time.monotonic() + remaining if remaining is not None else None,
        )

    async def _events(
        self, req: Request, queue: asyncio.Queue[TokenEvent], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[TokenEvent]:
        """The request's token events, in order; cancels the request if the client goes away."""
        done = False
        try:
            while True:
                ev = await queue.get()
                if ev.error is not None:
                    done = True
                    code = status_for(ev.error)
                    if code == grpc.StatusCode.INTERNAL:
                        log.error("request %s failed: %r", req.request_id, ev.error)
                    await context.abort(code, f"request {req.request_id}: {ev.error}")
                if ev.cancelled:
                    done = True
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request cancelled or past its deadline")
                yield ev
                if ev.final:
                    done = True
                    return
        finally:
            if not done:
                req.cancel()
                self.engine.wake()
