"""The load generator over the OpenAI-compatible API: streamed /v1/completions, timed per event.

The same requests as the gRPC client sends (token-id prompts, greedy, `ignore_eos`,
exactly the asked-for number of tokens), as server-sent events with the usage chunk;
the token count comes from that usage, since an event carries text, not token ids.

The client is as lean as the gRPC one, so that on a small machine the two compare the
servers' APIs rather than the clients: aiohttp (its C HTTP parser), the body read as it
arrives and cut into events at the blank line, one `json.loads` per event. Every event
in one read is timed at that read. Needs `aiohttp` (in the `test` extra).
"""

from __future__ import annotations

import asyncio
import json
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
    return asyncio.run(_run(base_url, config, requests, clients, arrivals, timeout_s))


async def _run(
    base_url: str,
    config: str,
    requests: list[BenchRequest],
    clients: int,
    arrivals: list[float] | None,
    timeout_s: float,
) -> RunResult:
    import aiohttp

    result = RunResult(config=config, requests=len(requests))
    concurrent = max(len(requests) if arrivals is not None else min(clients, len(requests)), 1)
    connector = aiohttp.TCPConnector(limit=concurrent, keepalive_timeout=timeout_s)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as http:
        base = await _base_model(http)
        # Every connection the run needs is opened before the clock starts, as the gRPC client's channel is.
        await asyncio.gather(*(_health(http) for _ in range(concurrent)))
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
    async with http.get("/v1/models") as resp:
        resp.raise_for_status()
        cards = (await resp.json())["data"]
    return next(m["id"] for m in cards if m.get("parent") is None)


async def _health(http: object) -> None:
    async with http.get("/health") as resp:
        await resp.read()


async def _one(http: object, base: str, r: BenchRequest, result: RunResult) -> None:
    body = {
        "model": r.adapter_id or base, "prompt": list(r.prompt_ids), "max_tokens": r.max_new_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    sent = time.perf_counter()
    times: list[float] = []
    tokens = 0
    try:
        async with http.post("/v1/completions", json=body) as resp:
            if resp.status != 200:
                text = await resp.text()
                result.errors.append(f"HTTP {resp.status}: {text[:200]} (adapter {r.adapter_id or 'base'!r})")
                return
            pending = b""
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                *events, pending = (pending + data).split(b"\n\n")
                for event in events:
                    if not event.startswith(b"data: ") or event == b"data: [DONE]":
                        continue
                    chunk = json.loads(event[6:])
                    if chunk.get("error"):
                        result.errors.append(f"stream error: {chunk['error'].get('message')}")
                        return
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif chunk.get("choices"):
                        times.append(now)
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
