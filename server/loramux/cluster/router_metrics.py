"""The router's counters and its view of the replicas, for the front's `/metrics`.

Ray Serve constructs the request router itself, inside the process that holds
the deployment handle (the front). The one channel from it to the front is this
process-wide table, keyed by deployment name; nothing else in loramux keeps
state at module level.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass
class RouterState:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)  # replica unique id -> its metadata

    def __post_init__(self) -> None:
        self.routed = Counter(
            "loramux_cluster_routed", "Requests routed to each replica (by its rank).", ("replica",),
            registry=self.registry,
        )  # fmt: skip
        self.spilled = Counter(
            "loramux_cluster_spilled",
            "Adapter requests sent to another replica than their rendezvous choice, because it was saturated.",
            registry=self.registry,
        )
        self.registry.register(_ReplicaInfo(self))


class _ReplicaInfo(Collector):
    """`loramux_cluster_replica{replica, metrics, pid} 1` for each live replica: where its own
    /metrics is, also after Ray restarted it on a new port."""

    def __init__(self, state: RouterState) -> None:
        self.state = state

    def collect(self):  # noqa: ANN201 (prometheus_client's interface)
        g = GaugeMetricFamily(
            "loramux_cluster_replica", "A live replica: its rank, /metrics address and process id.",
            labels=("replica", "metrics", "pid"),
        )  # fmt: skip
        for m in list(self.state.replicas.values()):
            g.add_metric((str(m.get("rank", "")), str(m.get("metrics", "")), str(m.get("pid", ""))), 1.0)
        yield g


_states: dict[str, RouterState] = {}
_lock = threading.Lock()


def router_state(deployment: str) -> RouterState:
    """The state of the router(s) of `deployment` in this process (made on first use)."""
    with _lock:
        state = _states.get(deployment)
        if state is None:
            state = _states[deployment] = RouterState()
        return state
