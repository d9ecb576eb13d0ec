"""`loramux cluster`: N engine replicas on Ray Serve behind one gRPC port and one HTTP port.

Ray is imported only when the command runs, so `loramux --help` works without the
`loramux[ray]` extra.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

from loramux.cluster.config import APP_NAME, ClusterConfig

REPLICAS_WAIT_S = 600.0  # how long to wait for the router to see every replica (model loads are slow)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from loramux.cli import _serve_parser

    # Every serve flag, as `loramux serve` defines it: its parser is the parent of this one.
    holder = argparse.ArgumentParser(add_help=False).add_subparsers()
    _serve_parser(holder)
    p = sub.add_parser("cluster", parents=[holder.choices["serve"]], add_help=False, help="run N replicas on Ray Serve")
    d = ClusterConfig()
    p.add_argument("--replicas", type=int, default=d.replicas, help="engine replicas")
    p.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=d.max_ongoing_requests,
        help="requests one replica holds at most; at this many it is saturated and requests spill",
    )
    p.add_argument("--ray-address", default=d.ray_address, help="join this Ray cluster (default: start one here)")
    for action in p._actions:  # serve's --threads, read per replica
        if "--threads" in action.option_strings:
            action.help = "torch threads (and Ray CPUs) of each replica; 0 = the cores divided by the replicas"
    p.set_defaults(func=run)


def cluster_config_from_args(a: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(replicas=a.replicas, max_ongoing_requests=a.max_ongoing_requests, ray_address=a.ray_address)


def run(a: argparse.Namespace) -> int:
    from loramux.cli import _config_from_args, _setup_logging

    try:
        config = _config_from_args(a)
        cluster = cluster_config_from_args(a)
        config.validate()
        cluster.validate()
    except ValueError as e:
        print(f"loramux cluster: {e}", file=sys.stderr)
        return 2
    try:
        import ray
        from ray import serve

        from loramux.cluster.app import build
    except ImportError as e:
        print(f"loramux cluster needs Ray Serve: pip install 'loramux[ray]' ({e})", file=sys.stderr)
        return 2
    _setup_logging(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if cluster.ray_address:
        ray.init(address=cluster.ray_address, logging_level="WARNING")
    else:
        cpus = max(os.cpu_count() or 1, cluster.replicas * cluster.threads_per_replica(config.threads))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    print(f"ray cluster at {ray.get_runtime_context().gcs_address}", flush=True)
    try:
        serve.start(proxy_location="Disabled")
        front = serve.run(build(config, cluster), name=APP_NAME, route_prefix=None)
        for replica in wait_for_replicas(front, cluster.replicas):
            print(f"replica {replica['rank']} metrics listening on {replica['metrics']}", flush=True)
        addresses = front.addresses.remote().result()
        print(f"metrics listening on {addresses['metrics']}", flush=True)
        if "http" in addresses:
            print(f"http listening on {addresses['http']}", flush=True)
        print(f"grpc listening on {addresses['grpc']}", flush=True)
        stop.wait()
        serve.delete(APP_NAME)  # each replica drains (its __del__) before it stops
    except Exception as e:
        print(f"loramux cluster: failed: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if not cluster.ray_address:
            serve.shutdown()
        ray.shutdown()
    return 0


def wait_for_replicas(front: Any, n: int) -> list[dict[str, Any]]:
    """The front's view of the replicas once it sees `n` of them (the router's view may lag
    `serve.run` by a moment). Raises TimeoutError when they do not all come up."""
    deadline = time.monotonic() + REPLICAS_WAIT_S
    while True:
        replicas = front.replicas.remote().result()
        if len(replicas) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if len(replicas) < n:
        raise TimeoutError(f"only {len(replicas)} of {n} replicas came up")
    return replicas
