"""Shared pieces of the operations tests: scraping /metrics, health checks, greedy requests."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_metrics_unit import Scrape

from loramux.v1 import loramux_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_LABELS = 3


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return Scrape(resp.read().decode())


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def health(channel: grpc.Channel, timeout: float = 5.0) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status


def greedy(ids: list[int], n: int, **kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=ids, params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True), **kw)


def try_health(channel: grpc.Channel) -> int | None:
    """The health status, or None while the server cannot answer yet."""
    try:
        return health(channel)
    except grpc.RpcError:
        return None
