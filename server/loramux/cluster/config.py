"""The cluster's own settings, and every setting from one flat mapping (a Serve config's `args`)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramux.config import EngineConfig, ServerConfig

APP_NAME = "loramux"
REPLICA_DEPLOYMENT = "LoramuxReplica"
FRONT_DEPLOYMENT = "LoramuxFront"
REPLICA_HEADER = "loramux-replica"  # the rank of the replica that answered (gRPC trailer, HTTP header)


@dataclass
class ClusterConfig:
    replicas: int = 2  # engine replicas (Ray Serve's num_replicas)
    max_ongoing_requests: int = 16  # requests one replica holds; at this many it is saturated
    ray_address: str = ""  # join this Ray cluster; "" = start one on this machine
    replica_deployment: str = REPLICA_DEPLOYMENT

    def validate(self) -> None:
        for name in ("replicas", "max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def threads_per_replica(self, threads: int) -> int:
        """Torch threads (and Ray CPUs) of each replica for the serve flag `--threads`:
        itself when set, else 0 = this machine's cores divided among the replicas (at least 1)."""
        from loramux.threads import available_cores

        return threads or max(1, available_cores() // self.replicas)


def _coerce(value: Any, hint: Any) -> Any:
    """A value from a Serve config or `serve run key=value` (often a string) as the field's type."""
    if value is None:
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    target = args[0] if args else hint
    if target is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"not a boolean: {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if target in (int, float, str, Path):
        return target(value)
    return value


def _fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"engine"}
    return {k: _coerce(v, hints[k]) for k, v in values.items() if k in names}


def configs_from_mapping(values: Mapping[str, Any]) -> tuple[ServerConfig, ClusterConfig]:
    """ServerConfig (with its EngineConfig) and ClusterConfig from flag names (`max-running` or
    `max_running`); an unknown name is a ValueError. Both are validated."""
    flat = {k.replace("-", "_"): v for k, v in values.items()}
    known = {f.name for c in (ServerConfig, EngineConfig, ClusterConfig) for f in dataclasses.fields(c)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(unknown)}")
    server = ServerConfig(**_fields(ServerConfig, flat), engine=EngineConfig(**_fields(EngineConfig, flat)))
    cluster = ClusterConfig(**_fields(ClusterConfig, flat))
    server.validate()
    cluster.validate()
    return server, cluster
