"""A real `loramux cluster` (Ray Serve, N replicas) in a subprocess, and ways to look into it."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from loramux.bench.prom import scrape
from loramux.bench.prom import total as sample
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

START_WAIT_S = 900.0  # Ray and two model loads on a shared 2-core machine: minutes, not seconds
LINE = re.compile(r"^(replica (\d+) metrics|metrics|grpc|http|ray cluster) (?:listening on|at) (\S+)$")


class ClusterProcess:
    """`loramux cluster ARGS` until it prints its grpc line; then stubs, metrics and its Ray address."""

    def __init__(self, args: Sequence[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loramux.cli", "cluster", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()  # Ray's logs must never fill the pipe
        self.replica_metrics: dict[int, str] = {}
        self.grpc = self.http = self.metrics = self.ray_address = ""
        deadline = time.monotonic() + START_WAIT_S
        while not self.grpc:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise RuntimeError("loramux cluster did not start:\n" + "\n".join(self.log[-60:]))
            m = LINE.match(line.strip())
            if m is None:
                continue
            what, rank, address = m.groups()
            if rank is not None:
                self.replica_metrics[int(rank)] = address
            elif what == "metrics":
                self.metrics = address
            elif what == "grpc":
                self.grpc = address
            elif what == "http":
                self.http = address
            else:
                self.ray_address = address
        self.channel = grpc.insecure_channel(self.grpc)
        self.gen = pb_grpc.GenerationStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line.rstrip())
            self.lines.put(line)
        self.lines.put(None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(180)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def store_loads(address: str) -> float:
    """Adapter loads from the store (disk) that one replica made."""
    return sample(scrape(address), "loramux_adapter_load_seconds_count", tier="store")


def request(adapter: str, prompt: list[int], n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=adapter, prompt_token_ids=prompt, params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True)
    )


def replica_of(call: grpc.Call) -> int:
    """The rank of the replica that answered (the front's trailing metadata)."""
    return int(dict(call.trailing_metadata())["loramux-replica"])


def burst(stub: pb_grpc.GenerationStub, reqs: Sequence[pb.GenerateRequest]) -> list[tuple[list[int], int]]:
    """Send every request at once (gRPC futures, no threads); (token ids, replica) of each, in order."""
    futures = [stub.Generate.future(r, timeout=600) for r in reqs]
    return [(list(f.result().token_ids), replica_of(f)) for f in futures]


def copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
    return dst
