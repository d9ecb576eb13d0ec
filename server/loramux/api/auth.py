"""The admin token that guards mutations of the Adapters service (`--admin-token-file`).

One gRPC server interceptor checks it for every mutating method, before the handler runs;
no handler checks it itself.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc

BEARER = "bearer"
# The Adapters methods that change something: they need the admin token when one is configured.
MUTATIONS = frozenset(
    f"/loramux.v1.Adapters/{m}" for m in ("UploadAdapter", "DeleteAdapter", "LoadAdapter", "UnloadAdapter")
)


class AdminAuth:
    """Checks `authorization: Bearer <token>` metadata; with no token configured, allows all."""

    def __init__(self, token: str | None) -> None:
        if token is not None and not token:
            raise ValueError("the admin token is empty")
        self._token = token.encode("utf-8") if token is not None else None

    @classmethod
    def from_file(cls, path: Path | None) -> AdminAuth:
        """Read the token once, at start; surrounding whitespace (the file's newline) is not part of it."""
        if path is None:
            return cls(None)
        token = Path(path).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"--admin-token-file {path} is empty")
        return cls(token)

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def refusal(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[grpc.StatusCode, str] | None:
        """None when `metadata` may mutate; else the status code and message to abort with."""
        if self._token is None:
            return None
        values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
        if not values:
            return grpc.StatusCode.UNAUTHENTICATED, "this call needs 'authorization: Bearer <admin token>' metadata"
        value = values[0].decode("utf-8", "replace") if isinstance(values[0], bytes) else values[0]
        scheme, _, presented = value.strip().partition(" ")
        if scheme.lower() != BEARER or not presented.strip():
            return grpc.StatusCode.UNAUTHENTICATED, "the authorization metadata must be 'Bearer <admin token>'"
        # Constant time over bytes: compare_digest on str only accepts ASCII.
        if not hmac.compare_digest(presented.strip().encode("utf-8"), self._token):
            return grpc.StatusCode.PERMISSION_DENIED, "wrong admin token"
        return None


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a mutation (`MUTATIONS`) whose metadata lacks the admin token: UNAUTHENTICATED / PERMISSION_DENIED."""

    def __init__(self, auth: AdminAuth) -> None:
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method not in MUTATIONS:
            return handler
        refused = self.auth.refusal(details.invocation_metadata)
        if refused is None:
            return handler

        async def abort(_request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(*refused)

        if handler.request_streaming:  # UploadAdapter: refused before any chunk is read
            return grpc.stream_unary_rpc_method_handler(abort)
        return grpc.unary_unary_rpc_method_handler(abort)
