"""uvicorn serving the HTTP app as one more task on the server's own asyncio loop.

The server's socket is bound here (port 0 picks a free one, which is then known
before the first request), and uvicorn gets it ready-made. uvicorn's own signal
handling is switched off: the loramux server owns SIGTERM / SIGINT and drains both
APIs together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("loramux.http")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on host:port (IPv4 or IPv6, as `host` resolves)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HttpFrontend:
    """`await start()` (returns the bound port), `await stop(grace)`."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        sock = bind(self.host, self.port)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app, http="httptools", lifespan="off", log_level="warning", access_log=False, timeout_keep_alive=30,
            timeout_graceful_shutdown=30,
        )  # fmt: skip
        self._server = _Server(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it stopped
                raise RuntimeError(f"the HTTP server on {self.host}:{self.port} stopped at start")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting; let responses in flight finish for up to `grace` seconds, then cut them."""
        if self._server is None or self._task is None:
            return
        # At least a moment, even for grace 0: uvicorn's wait for its sockets to close shares this timeout.
        self._server.config.timeout_graceful_shutdown = max(grace or 0.0, 1.0)
        self._server.should_exit = True
        try:
            await self._task
        except Exception:
            log.exception("the HTTP server stopped with an error")
        self._server = self._task = None
