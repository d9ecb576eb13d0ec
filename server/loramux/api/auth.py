"""The admin token that guards mutations of the Adapters service (`--admin-token-file`)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

import grpc

BEARER = "bearer"


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

    async def check(self, context: grpc.aio.ServicerContext) -> None:
        """Abort the call unless its metadata carries the admin token."""
        refused = self.refusal(context.invocation_metadata())
        if refused is not None:
            await context.abort(*refused)
