"""The cluster's request router: adapter affinity by rendezvous hashing, spill when saturated.

Ray Serve asks `choose_replicas` for ranked groups of replicas and sends the
request to the least-loaded replica of the first group that has one below
`max_ongoing_requests` (a replica at its limit also refuses the request itself),
waiting with back-off when every group is full. So:

* an adapter's request ranks first the replica that rendezvous hashing on the
  adapter id prefers, and all the others second: it goes to its own replica
  unless that one is saturated, and then to the least loaded of the rest (a
  *spill*). A cold burst over k adapters thus loads each adapter once, on its
  replica, instead of on whichever replica is free;
* a request without an adapter (the base model, listings) has one group of
  every replica: the least loaded takes it;
* no replica ever holds more than `max_ongoing_requests`: that is the bound.

The deployment's methods are called with the key as the `route_key` keyword.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from loramux.cluster.rendezvous import rendezvous_order
from loramux.cluster.router_metrics import RouterState, router_state


def route_key(pending_request: PendingRequest | None) -> str:
    if pending_request is None:
        return ""
    return str(pending_request.kwargs.get("route_key", "") or "")


def replica_label(replica: RunningReplica) -> str:
    """The replica's rank (what `loramux cluster` prints), or its unique id before it is known."""
    rank = replica.replica_metadata.get("rank")
    return str(rank) if rank is not None else replica.replica_id.unique_id


class AdapterAffinityRouter(RequestRouter):
    @property
    def state(self) -> RouterState:
        return router_state(self._deployment_id.name)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = route_key(pending_request)
        if not key or len(candidate_replicas) < 2:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = rendezvous_order(key, by_id)
        return [[by_id[order[0]]], [by_id[u] for u in order[1:]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        replica = self.curr_replicas.get(replica_id)
        self.state.routed.labels(replica_label(replica) if replica is not None else replica_id.unique_id).inc()
        key = route_key(pending_request)
        if key and len(self.curr_replicas) > 1:
            preferred = rendezvous_order(key, (r.unique_id for r in self.curr_replicas))[0]
            if preferred != replica_id.unique_id:
                self.state.spilled.inc()

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.state.replicas = {r.replica_id.unique_id: r.replica_metadata for r in replicas}
