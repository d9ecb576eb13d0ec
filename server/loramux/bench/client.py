"""The load generator: gRPC streaming requests to a loramux server, timed per token."""

from __future__ import annotations

import asyncio
import time

import grpc

from loramux.bench.result import RunResult
from loramux.bench.workload import BenchRequest
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc


def run_requests(
    address: str,
    config: str,
    requests: list[BenchRequest],
    clients: int,
    arrivals: list[float] | None = None,
    timeout_s: float = 600.0,
) -> RunResult:
    """Send `requests` (closed loop of `clients`, or open loop at `arrivals`) and time every token."""
    return asyncio.run(_run(address, config, requests, clients, arrivals, timeout_s))


async def _run(
    address: str,
    config: str,
    requests: list[BenchRequest],
    clients: int,
    arrivals: list[float] | None,
    timeout_s: float,
) -> RunResult:
    result = RunResult(config=config, requests=len(requests))
    # One channel per run, opened before the clock starts, so connection set-up is not timed.
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        await asyncio.wait_for(ch.channel_ready(), 60)
        stub = pb_grpc.GenerationStub(ch)
        start = time.perf_counter()
        if arrivals is None:
            queue = list(reversed(list(enumerate(requests))))

            async def client() -> None:
                while queue:
                    i, r = queue.pop()
                    await _one(stub, r, result, timeout_s, i)

            await asyncio.gather(*(client() for _ in range(min(clients, len(requests)))))
        else:

            async def at(t: float, r: BenchRequest, i: int) -> None:
                await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
                await _one(stub, r, result, timeout_s, i)

            await asyncio.gather(*(at(t, r, i) for i, (t, r) in enumerate(zip(arrivals, requests))))
        result.wall_s = time.perf_counter() - start
    return result


async def _one(
    stub: pb_grpc.GenerationStub,
    r: BenchRequest,
    result: RunResult,
    timeout_s: float,
    index: int = -1,
    times: list[float] | None = None,
) -> None:
    """Stream one request; its token ids go to `result.outputs[index]`, its arrival times to `times`."""
    msg = pb.GenerateRequest(
        adapter_id=r.adapter_id,
        prompt_token_ids=list(r.prompt_ids),
        # ignore_eos: every configuration generates exactly the asked-for number of tokens.
        params=pb.SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True, **dict(r.sampling)),
    )
    sent = time.perf_counter()
    last: float | None = None
    out = result.outputs.setdefault(index, [])
    if times is None:
        times = result.token_times.setdefault(index, [])
    try:
        async for m in stub.GenerateStream(msg, timeout=timeout_s):
            now = time.perf_counter()
            n = len(m.token_ids)
            if n == 0:
                continue
            if last is None:
                result.ttft_s.append(now - sent)
                # A first message carrying several tokens: the ones after the first arrived with it.
                result.itl_s.extend([0.0] * (n - 1))
            else:
                result.itl_s.extend([(now - last) / n] * n)
            last = now
            result.tokens += n
            out.extend(m.token_ids)
            if times is not None:
                times.extend([now] * n)
    except grpc.aio.AioRpcError as e:
        result.errors.append(f"{e.code().name}: {e.details()} (adapter {r.adapter_id or 'base'!r})")
