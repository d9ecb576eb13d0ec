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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from loramux.api.bridge import EventBridge
from loramux.api.errors import NotFound, status_for
from loramux.engine.engine import Engine
from loramux.engine.request import Request, SamplingParams, TokenEvent
from loramux.logs import clip, log_request
from loramux.v1 import loramux_pb2 as pb

MAX_REQUEST_ID_BYTES = 256
ID_LOGGED_CHARS = 128  # a client-given id is cut to this in a log line (and, quoted, in a message)


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


class Prompts:
    """A front-end's prompts to token ids: bounded by size first, then tokenized off the event loop.

    A token covers at most as many characters as the longest entry of the vocabulary, so a
    text longer than `max_len` x that many characters cannot fit the context whatever it
    tokenizes to: it is refused before tokenizing. The rest is tokenized on one worker
    thread of this front-end, so a long prompt never stalls the event loop (other RPCs)."""

    def __init__(self, tokenizer: Any, max_len: int) -> None:
        self.tokenizer = tokenizer
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_chars = max_len * max(1, longest)
        self.max_len = max_len
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-tokenize")

    def _check_size(self, chars: int) -> None:
        if chars > self.max_chars:
            raise ValueError(
                f"the prompt ({chars} characters) cannot fit the model's context of "
                f"{self.max_len} tokens (at most {self.max_chars} characters)"
            )

    def close(self) -> None:
        """Stop the tokenizer thread (the server's stop): queued work is dropped, a running call finishes."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def ids(self, msg: pb.GenerateRequest) -> list[int]:
        """The prompt's token ids, whichever of prompt, messages and prompt_token_ids it set."""
        loop = asyncio.get_running_loop()
        if msg.prompt:
            self._check_size(len(msg.prompt))
            encoded = await loop.run_in_executor(self._pool, self.tokenizer, msg.prompt)
            return list(encoded.input_ids)
        if msg.messages:
            messages = [{"role": m.role, "content": m.content} for m in msg.messages]
            self._check_size(sum(len(m["content"]) for m in messages))  # the template only adds to it
            return await loop.run_in_executor(self._pool, chat_prompt_ids, self.tokenizer, messages)
        return list(msg.prompt_token_ids)


async def build_request(
    msg: pb.GenerateRequest,
    prompts: Prompts,
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
        raise NotFound(f"unknown adapter {clip(msg.adapter_id, ID_LOGGED_CHARS)}")
    return Request(
        request_id=msg.request_id or uuid.uuid4().hex,
        prompt_ids=await prompts.ids(msg),
        params=sampling_params(msg.params),
        adapter_id=msg.adapter_id,
        return_logprobs=msg.return_logprobs,
        deadline=deadline,
        frontend=frontend,
    )


async def admit(
    engine: Engine,
    msg: pb.GenerateRequest,
    prompts: Prompts,
    adapter_exists: Callable[[str], bool],
    deadline: float | None,
    frontend: str,
    bridge: EventBridge,
) -> tuple[Request, asyncio.Queue[TokenEvent]]:
    """Build, validate and submit on the running event loop; returns the request and its event queue.

    The engine's events reach the queue through `bridge` (the server's one, on this loop).
    Raises what the request was refused with, after counting and logging the refusal;
    the front-end maps the exception to its status with `status_for`."""
    queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
    req: Request | None = None
    try:
        req = await build_request(msg, prompts, adapter_exists, deadline, frontend)
        engine.validate(req)
        # The sink is set before submit: the engine may step before this coroutine resumes.
        req.sink = bridge.sink(queue)
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
            "request_id": req.request_id if req is not None else msg.request_id[:ID_LOGGED_CHARS] or None,
            "adapter_id": msg.adapter_id[:ID_LOGGED_CHARS],
            "status": "rejected",
            "prompt_tokens": req.prompt_len if req is not None else None,
            "generated_tokens": 0,
            "frontend": frontend,
            "code": code,
            "error": str(err),
        }
    )


async def events(
    engine: Engine, req: Request, queue: asyncio.Queue[TokenEvent], coalesce: bool = False
) -> AsyncIterator[TokenEvent]:
    """The request's token events, in order, up to the final one.

    With `coalesce`, the token events already waiting in the queue when one is taken
    are joined into one (their tokens, text and logprobs in order, the last one's
    finish reason): a consumer that fell behind catches up in one message instead of
    one per token. An error or a cancel is never joined: it comes after the tokens
    before it. Raises the engine's error for a failed request, RequestCancelled for a
    dropped one. If the consumer stops early (its client went away), the request is
    cancelled and the engine frees it at its next step."""
    done = False
    held: TokenEvent | None = None  # an error or cancel taken while joining, for the next turn
    try:
        while True:
            if held is not None:
                ev, held = held, None
            else:
                ev = await queue.get()
            if ev.error is not None:
                done = True
                raise ev.error
            if ev.cancelled:
                done = True
                raise RequestCancelled("request cancelled or past its deadline")
            while coalesce and not ev.final and not queue.empty():
                nxt = queue.get_nowait()
                if nxt.error is not None or nxt.cancelled:
                    held = nxt
                    break
                ev = join(ev, nxt)
            yield ev
            if ev.final:
                done = True
                return
    finally:
        if not done:
            cancel(engine, req)


def join(a: TokenEvent, b: TokenEvent) -> TokenEvent:
    """Two consecutive token events of one request as one."""
    return TokenEvent(a.token_ids + b.token_ids, a.text + b.text, a.logprobs + b.logprobs, b.finish_reason)


def cancel(engine: Engine, req: Request) -> None:
    """Thread-safe: the engine drops `req` at its next step (counted `cancelled`)."""
    req.cancel()
    engine.wake()
