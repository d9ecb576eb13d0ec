"""OpenAI request bodies -> the contract's GenerateRequests; engine results -> OpenAI's response shapes.

A call with P prompts and `n` choices becomes P·n engine requests; choice `i·n + j`
is prompt i's j-th sample (OpenAI's order). With a seed, choice j samples with
`seed + j`, so the choices of one call differ and the call is reproducible.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from loramux.engine.request import FinishReason, InvalidParameter
from loramux.http.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from loramux.v1 import loramux_pb2 as pb

FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP: "stop"}
_string = json.encoder.encode_basestring  # one str as JSON, non-ASCII kept (C, as json.dumps uses)


def to_json(obj: Any) -> str:
    """Compact JSON, non-ASCII kept: what every body and event of the HTTP API is written as."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sampling(body: _Sampling, max_new_tokens: int, choice: int) -> pb.SamplingParams:
    """The contract's parameters for an OpenAI body (OpenAI's defaults where it leaves one unset)."""
    p = pb.SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k in (None, -1) else body.top_k,
        stop=body.stop_list,
        repetition_penalty=body.repetition_penalty,
        ignore_eos=body.ignore_eos,
        min_p=body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
    )
    if body.seed is not None:
        p.seed = (body.seed + choice) % 2**64
    return p


def completion_requests(body: CompletionRequest, adapter_id: str, request_id: str) -> list[pb.GenerateRequest]:
    out = []
    for i, prompt in enumerate(body.prompts()):
        for j in range(body.n):
            msg = pb.GenerateRequest(
                adapter_id=adapter_id, request_id=f"{request_id}-{i * body.n + j}",
                params=sampling(body, body.max_tokens or 0, j), return_logprobs=body.logprobs is not None,
            )  # fmt: skip
            if isinstance(prompt, str):
                if not prompt:
                    raise InvalidParameter("prompt", "prompt is empty")
                msg.prompt = prompt
            else:
                msg.prompt_token_ids.extend(prompt)
            out.append(msg)
    return out


def chat_requests(body: ChatCompletionRequest, adapter_id: str, request_id: str) -> list[pb.GenerateRequest]:
    messages = [pb.ChatMessage(role=m.role, content=m.text) for m in body.messages]
    return [
        pb.GenerateRequest(
            adapter_id=adapter_id,
            request_id=f"{request_id}-{j}",
            messages=messages,
            params=sampling(body, body.max_new_tokens, j),
            return_logprobs=body.logprobs,
        )  # fmt: skip
        for j in range(body.n)
    ]


@dataclass
class Choice:
    """What one engine request produced so far."""

    index: int
    prompt_index: int
    text: list[str] = field(default_factory=list)
    chars: int = 0  # characters of text so far (where the next token's text_offset starts)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0


def usage(choices: list[Choice]) -> dict[str, Any]:
    """Prompt tokens count once per prompt (its choices share it), completion tokens once per choice."""
    prompts: dict[int, tuple[int, int]] = {}
    for c in choices:
        tokens, cached = prompts.get(c.prompt_index, (0, 0))
        prompts[c.prompt_index] = (max(tokens, c.prompt_tokens), max(cached, c.cached_tokens))
    prompt_tokens = sum(t for t, _ in prompts.values())
    completion = sum(len(c.token_ids) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": sum(c for _, c in prompts.values())},
    }


class Shapes:
    """The response and chunk bodies of one call.

    A stream's chunks differ only in their choice, so a chunk is written from text made
    once per call (its head: id, object, created, model) and the choice's few values,
    each encoded as JSON on its own: the same bytes as `to_json` of the chunk's dict
    (tests/test_http_stream.py compares them), without building and walking a dict of
    dicts per streamed token."""

    def __init__(self, kind: str, request_id: str, model: str, tokenizer: Any) -> None:
        self.kind = kind  # "completion" or "chat"
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._chunk_head = to_json(self._head(obj))[:-1] + ',"choices":[{"index":'  # without its closing brace

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def token_strings(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in ids]

    def logprobs(self, ids: list[int], lps: list[float], offset: int = 0) -> dict[str, Any]:
        """OpenAI's logprobs object for these tokens; `offset` is where their text starts in the choice."""
        tokens = self.token_strings(ids)
        if self.kind == "chat":
            return {
                "content": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                    for t, lp in zip(tokens, lps)
                ]
            }
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": None, "text_offset": offsets}

    def response(self, choices: list[Choice], with_logprobs: bool) -> dict[str, Any]:
        out = []
        for c in choices:
            text = "".join(c.text)
            lp = self.logprobs(c.token_ids, c.logprobs) if with_logprobs else None
            if self.kind == "chat":
                out.append(
                    {
                        "index": c.index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": lp,
                        "finish_reason": c.finish_reason,
                    }
                )
            else:
                out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": out, "usage": usage(choices)}

    def chunk(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None,
        logprobs: dict | None,
        include_usage: bool,
        first: bool = False,
    ) -> str:
        """One choice's chunk as JSON: {head, "choices": [{"index", "text" | "delta", "logprobs",
        "finish_reason"}], "usage": null where the call asked for a usage chunk}."""
        lp = "null" if logprobs is None else to_json(logprobs)
        finish = "null" if finish_reason is None else _string(finish_reason)
        if self.kind == "chat":
            delta = []
            if first:
                delta.append('"role":"assistant"')
            if text is not None:
                delta.append('"content":' + _string(text))
            body = f'"delta":{{{",".join(delta)}}}'
        else:
            body = '"text":' + _string(text or "")
        tail = ',"usage":null}' if include_usage else "}"
        return f'{self._chunk_head}{index},{body},"logprobs":{lp},"finish_reason":{finish}}}]{tail}'

    def usage_chunk(self, choices: list[Choice]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(choices)}
