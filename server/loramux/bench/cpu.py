"""CPU time per generated token of one run: the bench's own process (the client) and the server's.

Throughput on a shared machine swings with other jobs' load; CPU seconds spent per token
do much less, so they show where two configurations differ even when their throughputs
are within the noise. The client's is this process's (every thread: the gRPC client's
C core included); the server's is read from /proc for a server the bench started.
"""

from __future__ import annotations

import resource

from loramux.bench.target import LoramuxTarget


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """Started before a run; `per_token(tokens)` after it: milliseconds of CPU per token, by whom."""

    def __init__(self, target: LoramuxTarget) -> None:
        self.target = target
        self.client = _own_cpu()
        self.server = target.cpu_seconds()

    def per_token(self, tokens: int) -> dict[str, float]:
        if tokens <= 0:
            return {}
        out = {"client_cpu_ms_per_token": (_own_cpu() - self.client) * 1000 / tokens}
        after = self.target.cpu_seconds()
        if self.server is not None and after is not None:
            out["server_cpu_ms_per_token"] = (after[0] - self.server[0]) * 1000 / tokens
            out["server_loop_cpu_ms_per_token"] = (after[1] - self.server[1]) * 1000 / tokens
        return out
