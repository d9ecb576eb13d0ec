"""What every front-end (gRPC, HTTP) does with a generate call: build, admit, follow, cancel.

A front-end turns its wire format into a `pb.GenerateRequest` (the contract's
message), and from there one code path validates it, makes the engine's
`Request`, submits it and yields its token events. So the gRPC API and the
OpenAI-compatible HTTP API cannot drift apart in what they accept or how they
count and log a request.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from loramux.api.errors import NotFound, status_for
from loramux.engine.engine import Engine
from loramux.engine.request import Request, SamplingParams, TokenEvent
from loramux.logs import log_request
from loramux.v1 import loramux_pb2 as pb

MAX_REQUEST_ID_BYTES = 256


class RequestCancelled(Exception):
    """The engine dropped the request: its client went away or its deadline passed."""


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of `messages` rendered by the tokenizer's chat template, with the
    generation prompt (the assistant turn's opening) appended."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; send a prompt instead of messages")
    for m in messages:
        if not m["role"]:
            raise ValueError("every chat message needs a role")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template writes any special tokens (BOS, turn markers) itself.
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def sampling_params(p: pb.SamplingParams) -> SamplingParams:
    """The engine's parameters for the contract's (validated later, once, by `SamplingParams.validate`).

    proto3 sends 0 for an unset float: only an exact 0 means "off"; NaN, negative or
    out-of-range values go on to validation and are refused there, never taken as off."""
    return SamplingParams(
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


def build_request(
    msg: pb.GenerateRequest,
    tokenizer: Any,
    adapter_exists: Callable[[str], bool],
    deadline: float | None,
    frontend: str,
) -> Request:
    """The engine's Request for a contract message; ValueError / NotFound say what is wrong."""
    sources = [bool(msg.prompt), len(msg.prompt_token_ids) > 0, len(msg.messages) > 0]
    if sum(sources) != 1:
        raise ValueError("set exactly one of prompt, prompt_token_ids and messages")
    if len(msg.request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise ValueError(f"request_id is longer than {MAX_REQUEST_ID_BYTES} bytes")
    if msg.adapter_id and not adapter_exists(msg.adapter_id):
        raise NotFound(f"unknown adapter {msg.adapter_id!r}")
    if msg.prompt:
        prompt_ids = list(tokenizer(msg.prompt).input_ids)
    elif msg.messages:
        prompt_ids = chat_prompt_ids(tokenizer, [{"role": m.role, "content": m.content} for m in msg.messages])
    else:
        prompt_ids = list(msg.prompt_token_ids)
    return Request(
        request_id=msg.request_id or uuid.uuid4().hex,
        prompt_ids=prompt_ids,
        params=sampling_params(msg.params),
        adapter_id=msg.adapter_id,
        return_logprobs=msg.return_logprobs,
        deadline=deadline,
        frontend=frontend,
    )


def admit(
    engine: Engine,
    msg: pb.GenerateRequest,
    tokenizer: Any,
    adapter_exists: Callable[[str], bool],
    deadline: float | None,
    frontend: str,
) -> tuple[Request, asyncio.Queue[TokenEvent]]:
    """Build, validate and submit on the running event loop; returns the request and its event queue.

    Raises what the request was refused with, after counting and logging the refusal;
    the front-end maps the exception to its status with `status_for`."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
    req: Request | None = None
    try:
        req = build_request(msg, tokenizer, adapter_exists, deadline, frontend)
        engine.validate(req)
        # The sink is set before submit: the engine may step before this coroutine resumes.
        req.sink = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
        engine.submit(req)
    except Exception as e:
        record_rejection(engine, msg, req, status_for(e).name, e, frontend)
        raise
    return req, queue


def record_rejection(
    engine: Engine | None, msg: pb.GenerateRequest, req: Request | None, code: str, err: BaseException, frontend: str
) -> None:
    """A request refused at admission still gets its metrics count and its log
    line (status `rejected`), so operators see refusals, not only successes."""
    if engine is not None and engine.metrics is not None:
        engine.metrics.request_rejected(code.lower(), frontend=frontend)
    log_request(
        {
            "request_id": req.request_id if req is not None else msg.request_id or None,
            "adapter_id": msg.adapter_id,
            "status": "rejected",
            "prompt_tokens": req.prompt_len if req is not None else None,
            "generated_tokens": 0,
            "frontend": frontend,
            "code": code,
            "error": str(err),
        }
    )


async def events(engine: Engine, req: Request, queue: asyncio.Queue[TokenEvent]) -> AsyncIterator[TokenEvent]:
    """The request's token events, in order, up to the final one.

    Raises the engine's error for a failed request, RequestCancelled for a dropped one.
    If the consumer stops early (its client went away), the request is cancelled and
    the engine frees it at its next step."""
    done = False
    try:
        while True:
            ev = await queue.get()
            if ev.error is not None:
                done = True
                raise ev.error
            if ev.cancelled:
                done = True
                raise RequestCancelled("request cancelled or past its deadline")
            yield ev
            if ev.final:
                done = True
                return
    finally:
        if not done:
            cancel(engine, req)


def cancel(engine: Engine, req: Request) -> None:
    """Thread-safe: the engine drops `req` at its next step (counted `cancelled`)."""
    req.cancel()
    engine.wake()
