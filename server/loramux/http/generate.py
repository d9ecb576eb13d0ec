"""/v1/completions and /v1/chat/completions: admit every choice, then answer at once or as SSE.

Every choice is one engine request, admitted through the same `admit` as gRPC (so the
same validation, metrics and request logs, with `frontend=http`). Admission happens
before the response starts, so a refused call gets its HTTP status even when it asked
for a stream. A client that disconnects cancels every request of its call at once:
a watcher waits for the ASGI `http.disconnect` message beside the generation.

A stream without logprobs sends the tokens that are already waiting when it writes
as one chunk (`events(coalesce=True)`): a stream that fell behind catches up in one
write, as vLLM's does. With logprobs every token keeps a chunk of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loramux.api.bridge import EventBridge
from loramux.api.errors import NotFound, status_for
from loramux.api.requests import Prompts, admit, cancel, events
from loramux.engine.engine import Engine
from loramux.engine.request import Request, TokenEvent
from loramux.http.convert import FINISH, Choice, Shapes, to_json
from loramux.http.errors import HttpError, error_body
from loramux.v1 import loramux_pb2 as pb

log = logging.getLogger("loramux.http")
FRONTEND = "http"
DONE = "data: [DONE]\n\n"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event of a dict, or of a chunk already written as JSON."""
    return f"data: {obj if isinstance(obj, str) else to_json(obj)}\n\n"


def cached_tokens(req: Request) -> int:
    """Prompt tokens served from the prefix cache (0 where the engine does not report it)."""
    return max(int(getattr(req, "cached_tokens", 0) or 0), 0)


async def disconnected(http: HttpRequest) -> None:
    """Returns when the client has gone away (the body was read already, so only that can arrive)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


class Generation:
    """One call: its engine requests, their choices, and the response shapes."""

    def __init__(
        self, engine: Engine, tokenizer: Any, adapter_exists: Callable[[str], bool], bridge: EventBridge
    ) -> None:
        self.engine = engine
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.prompts = Prompts(tokenizer, engine.max_len)  # bounded, then tokenized off the event loop
        self.adapter_exists = adapter_exists

    async def admit_all(
        self, msgs: list[pb.GenerateRequest], model: str
    ) -> list[tuple[Request, asyncio.Queue[TokenEvent]]]:
        admitted: list[tuple[Request, asyncio.Queue[TokenEvent]]] = []
        try:
            for m in msgs:
                admitted.append(
                    await admit(self.engine, m, self.prompts, self.adapter_exists, None, FRONTEND, self.bridge)
                )
        except BaseException as e:  # a refusal, or the call cancelled while a prompt was tokenized
            for req, _ in admitted:
                cancel(self.engine, req)
            if isinstance(e, NotFound):
                raise HttpError(grpc.StatusCode.NOT_FOUND, f"The model `{model}` does not exist.", "model") from e
            raise
        return admitted

    async def respond(
        self,
        http: HttpRequest,
        kind: str,
        request_id: str,
        msgs: list[pb.GenerateRequest],
        model: str,
        n: int,
        stream: bool,
        include_usage: bool,
        with_logprobs: bool,
    ) -> Response:
        admitted = await self.admit_all(msgs, model)
        shapes = Shapes(kind, request_id, model, self.tokenizer)
        choices = [
            Choice(index=k, prompt_index=k // n, prompt_tokens=req.prompt_len) for k, (req, _) in enumerate(admitted)
        ]
        if stream:
            body = self._stream(http, admitted, choices, shapes, include_usage, with_logprobs)
            return StreamingResponse(
                body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        try:
            await _unless_disconnected(http, self._collect(admitted, choices))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the requests are cancelled
        except BaseException:
            for req, _ in admitted:
                cancel(self.engine, req)
            raise
        return JSONResponse(shapes.response(choices, with_logprobs))

    async def _collect(self, admitted: list[tuple[Request, asyncio.Queue[TokenEvent]]], choices: list[Choice]) -> None:
        async def follow(c: Choice, req: Request, queue: asyncio.Queue[TokenEvent]) -> None:
            async with aclosing(events(self.engine, req, queue)) as stream:
                async for ev in stream:
                    _add(c, ev)
            c.cached_tokens = cached_tokens(req)

        await asyncio.gather(*(follow(c, req, q) for c, (req, q) in zip(choices, admitted)))

    async def _stream(
        self,
        http: HttpRequest,
        admitted: list[tuple[Request, asyncio.Queue[TokenEvent]]],
        choices: list[Choice],
        shapes: Shapes,
        include_usage: bool,
        with_logprobs: bool,
    ) -> AsyncIterator[str]:
        watch = asyncio.ensure_future(disconnected(http))
        watch.add_done_callback(lambda f: f.cancelled() or [cancel(self.engine, r) for r, _ in admitted])
        try:
            if shapes.kind == "chat":
                for c in choices:
                    yield sse(shapes.chunk(c.index, "", None, None, include_usage, first=True))
            async with aclosing(self._merged(admitted, coalesce=not with_logprobs)) as stream:
                async for k, ev in stream:
                    c = choices[k]
                    offset = c.chars
                    _add(c, ev)
                    if ev.final:
                        c.cached_tokens = cached_tokens(admitted[k][0])
                    if ev.text or ev.final or (with_logprobs and ev.token_ids):
                        lp = shapes.logprobs(ev.token_ids, ev.logprobs, offset) if with_logprobs else None
                        yield sse(shapes.chunk(k, ev.text, c.finish_reason, lp, include_usage))
            if include_usage:
                yield sse(shapes.usage_chunk(choices))
            yield DONE
        except Exception as e:  # the response has started: the error goes out as an event
            code = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.error("request %s failed: %r", shapes.id, e)
            yield sse(error_body(str(e), code))
        finally:
            watch.cancel()
            for req, _ in admitted:
                if not req.finish_reason:
                    cancel(self.engine, req)

    async def _merged(
        self, admitted: list[tuple[Request, asyncio.Queue[TokenEvent]]], coalesce: bool
    ) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice, event) of every request of the call, as they come; raises the first failure."""
        if len(admitted) == 1:  # the common case, without a task and a second queue per event
            req, queue = admitted[0]
            async with aclosing(events(self.engine, req, queue, coalesce)) as stream:
                async for ev in stream:
                    yield 0, ev
            return
        merged: asyncio.Queue[tuple[int, TokenEvent | None, BaseException | None]] = asyncio.Queue()

        async def pump(k: int, req: Request, queue: asyncio.Queue[TokenEvent]) -> None:
            try:
                async with aclosing(events(self.engine, req, queue, coalesce)) as stream:
                    async for ev in stream:
                        merged.put_nowait((k, ev, None))
            except Exception as e:
                merged.put_nowait((k, None, e))

        tasks = [asyncio.ensure_future(pump(k, req, q)) for k, (req, q) in enumerate(admitted)]
        try:
            left = len(tasks)
            while left:
                k, ev, err = await merged.get()
                if err is not None:
                    raise err
                yield k, ev
                if ev.final:
                    left -= 1
        finally:
            for t in tasks:
                t.cancel()


def _add(c: Choice, ev: TokenEvent) -> None:
    c.text.append(ev.text)
    c.chars += len(ev.text)
    c.token_ids.extend(ev.token_ids)
    c.logprobs.extend(ev.logprobs)
    if ev.final:
        c.finish_reason = FINISH.get(ev.finish_reason)


async def _unless_disconnected(http: HttpRequest, work: Awaitable[None]) -> None:
    """Await `work`; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected(http))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        task.result()
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone
