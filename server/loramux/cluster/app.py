"""The Ray Serve application: N engine replicas behind one front.

    serve run loramux.cluster.app:build_app model=demo store=/shared/adapters replicas=2 port=50051

or, in a Serve config file (`serve deploy config.yaml`, `serve run config.yaml`)::

    applications:
      - name: loramux
        route_prefix: null
        import_path: loramux.cluster.app:build_app
        args: {model: /models/base, store: /shared/adapters, replicas: 4, max_ongoing_requests: 16}

`args` takes every `loramux serve` flag and the cluster's own (`replicas`,
`max_ongoing_requests`), by their field names; `threads` is per replica. `loramux cluster` builds
the same application from its command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from loramux.cluster.config import FRONT_DEPLOYMENT, ClusterConfig, configs_from_mapping
from loramux.cluster.front import Front
from loramux.cluster.replica import ReplicaServer
from loramux.cluster.router import AdapterAffinityRouter
from loramux.config import ServerConfig


def build(config: ServerConfig, cluster: ClusterConfig) -> serve.Application:
    """The application for validated configs."""
    threads = cluster.threads_per_replica(config.threads)
    config = dataclasses.replace(absolute_paths(config), threads=threads)
    replica = serve.deployment(
        name=cluster.replica_deployment,
        num_replicas=cluster.replicas,
        max_ongoing_requests=cluster.max_ongoing_requests,
        # Past every replica's limit requests wait in the router, as many as one engine queues.
        max_queued_requests=config.engine.max_queue,
        ray_actor_options={"num_cpus": threads},
        request_router_config=RequestRouterConfig(request_router_class=AdapterAffinityRouter),
        graceful_shutdown_timeout_s=config.drain_timeout + 5,
        health_check_period_s=5,
    )(ReplicaServer)
    front = serve.deployment(
        name=FRONT_DEPLOYMENT,
        num_replicas=1,
        max_ongoing_requests=1000,  # only addresses() / replicas() go through Serve; gRPC has its own server
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=config.drain_timeout + 5,
    )(Front)
    return front.bind(replica.bind(config), config, cluster)


def absolute_paths(config: ServerConfig) -> ServerConfig:
    """Replicas run in Ray's worker processes, whose working directory is not the caller's."""

    def resolve(p: Path | None) -> Path | None:
        return None if p is None else Path(p).expanduser().resolve()

    model = config.model
    if model != "demo" and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return dataclasses.replace(
        config, model=model, store=resolve(config.store), admin_token_file=resolve(config.admin_token_file),
        tls_cert=resolve(config.tls_cert), tls_key=resolve(config.tls_key),
        api_key_file=resolve(config.api_key_file), allowed_adapter_dir=resolve(config.allowed_adapter_dir),
    )  # fmt: skip


def build_app(args: Mapping[str, Any]) -> serve.Application:
    """Ray Serve's application builder: `args` from `serve run ... key=value` or a config file."""
    return build(*configs_from_mapping(args))
