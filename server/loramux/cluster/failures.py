"""What a failure of Ray itself (not of a replica's server) means in the contract's statuses."""

from __future__ import annotations

import grpc


def ray_status(e: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The contract's status for a failure of Ray itself (not of the replica's server)."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(e, (RayActorError, ActorUnavailableError)):
        return grpc.StatusCode.UNAVAILABLE, f"the replica serving this call failed: {type(e).__name__}"
    if isinstance(e, DeploymentUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, "no replica is available"
    if isinstance(e, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "every replica is saturated and the cluster's queue is full"
    return None
