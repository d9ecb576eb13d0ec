"""The load generator over the OpenAI-compatible API: streamed /v1/completions, timed per chunk.

The same requests as the gRPC client sends (token-id prompts, greedy, `ignore_eos`,
exactly the asked-for number of tokens), as server-sent events with the usage chunk;
the token count comes from that usage, since an event carries text, not token ids.
Needs `httpx` (in the `test` extra).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from loramux.bench.result import RunResult
from loramux.bench.workload import BenchRequest


def run_http_requests(
    base_url: str,
    config: str,
    requests: list[BenchRequest],
    clients: int,
    arrivals: list[float] | None = None,
    timeout_s: float = 600.0,
) -> RunResult:
    """Send `requests` (closed loop of `clients`, or open loop at `arrivals`) and time every event."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request in the bench's log
    return asyncio.run(_run(base_url, config, requests, clients, arrivals, timeout_s))


async def _run(
    base_url: str,
    config: str,
    requests: list[BenchRequest],
    clients: int,
    arrivals: list[float] | None,
    timeout_s: float,
) -> RunResult:
    import httpx

    result = RunResult(config=config, requests=len(requests))
    concurrent = len(requests) if arrivals is not None else min(clients, len(requests))
    limits = httpx.Limits(max_connections=max(concurrent, 1), max_keepalive_connections=max(concurrent, 1))
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout_s) as http:
        base = await _base_model(http)
        # Every connection the run needs is opened before the clock starts, as the gRPC client's channel is.
        await asyncio.gather(*(http.get("/health") for _ in range(concurrent)))
        start = time.perf_counter()
        if arrivals is None:
            queue = list(reversed(requests))

            async def client() -> None:
                while queue:
                    await _one(http, base, queue.pop(), result)

            await asyncio.gather(*(client() for _ in range(concurrent)))
        else:

            async def at(t: float, r: BenchRequest) -> None:
                await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
                await _one(http, base, r, result)

            await asyncio.gather(*(at(t, r) for t, r in zip(arrivals, requests)))
        result.wall_s = time.perf_counter() - start
    return result


async def _base_model(http: object) -> str:
    resp = await http.get("/v1/models")
    resp.raise_for_status()
    return next(m["id"] for m in resp.json()["data"] if m.get("parent") is None)


async def _one(http: object, base: str, r: BenchRequest, result: RunResult) -> None:
    body = {
        "model": r.adapter_id or base, "prompt": list(r.prompt_ids), "max_tokens": r.max_new_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    sent = time.perf_counter()
    times: list[float] = []
    tokens = 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                result.errors.append(f"HTTP {resp.status_code}: {resp.text[:200]} (adapter {r.adapter_id or 'base'!r})")
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    result.errors.append(f"stream error: {chunk['error'].get('message')}")
                    return
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk.get("choices"):
                    times.append(time.perf_counter())
    except Exception as e:  # a transport failure counts as this request's error, the run goes on
        result.errors.append(f"{type(e).__name__}: {e} (adapter {r.adapter_id or 'base'!r})")
        return
    if not times or tokens == 0:
        return
    result.ttft_s.append(times[0] - sent)
    # Events after the first, spread over the tokens after the first (an event is usually one token).
    rest = max(tokens - 1, 0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    if rest and len(gaps) == rest:
        result.itl_s.extend(gaps)
    elif rest and gaps:  # some events carried several tokens (or none, where a character was incomplete)
        result.itl_s.extend([sum(gaps) / rest] * rest)
    result.tokens += tokens
