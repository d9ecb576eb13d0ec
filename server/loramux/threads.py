"""Torch's thread count (`--threads`): by default one less than the cores this process may use.

Torch sizes its intra-op pool to every core. The server has threads of its own
beside it (the gRPC event loop, tokenization, adapter loads), and when they
compete with a pool that fills every core, the pool's threads wait on each
other: decode steps on a loaded server went from 2 ms to 50 ms. Leaving one core
to the rest avoids it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("loramux.server")

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, bounded by a cgroup v2 CPU quota if any."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_threads() -> int:
    return max(1, available_cores() - 1)


def apply_threads(threads: int) -> int:
    """Set torch's intra-op thread count (0 = the default above); returns the count set."""
    n = threads or default_threads()
    torch.set_num_threads(n)
    log.info("torch threads: %d (of %d available cores)", n, available_cores())
    return n
