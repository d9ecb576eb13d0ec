"""A real loramux server on loopback, run in a background thread of the test process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from loramux.api.server import LoramuxServer
from loramux.config import EngineConfig, ServerConfig
from loramux.v1 import loramux_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
# The LoRA path of the servers tests start, unless a test names one (`pytest --lora-path PATH`, conftest.py).
LORA_PATH = "auto"


class ServerThread:
    def __init__(self, model: str | Path = "demo", store: Path | None = None, **overrides: object) -> None:
        overrides.setdefault("lora_path", LORA_PATH)
        overrides.setdefault("compile", False)  # compiling takes longer than most tests run (test_compiled.py compiles)
        engine_fields = set(EngineConfig.__dataclass_fields__)
        engine = EngineConfig(**{k: v for k, v in overrides.items() if k in engine_fields})
        rest = {k: v for k, v in overrides.items() if k not in engine_fields}
        rest.setdefault("device", "cpu")
        rest.setdefault("http_port", -1)  # the OpenAI-compatible API only where a test asks for it (http_port=0)
        self.config = ServerConfig(
            model=str(model),
            store=store or Path(tempfile.mkdtemp(prefix="loramux-store-")),
            port=0,
            metrics_port=0,
            engine=engine,
            **rest,
        )
        self.loop = asyncio.new_event_loop()
        self.server = LoramuxServer(self.config)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(300):
            raise TimeoutError("server did not start")
        if self._error is not None:
            raise self._error
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.gen = pb_grpc.GenerationStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            try:
                await self.server.start()
            except BaseException as e:  # surfaced to the constructor
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            await self.server.wait()

        self.loop.run_until_complete(main())

    @property
    def engine(self):  # noqa: ANN201
        return self.server.engine

    def stop(self) -> None:
        self.channel.close()
        if not self.server._stopped.is_set():
            asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 60.0, interval: float = 0.005) -> None:
    """Poll `cond` every `interval` s until it holds (a condition to reach, never a time to assert);
    `timeout` only bounds a wait that would otherwise hang, and fails it."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(interval)


class Hold:
    """Hold the engine loop between two steps, so that what is sent meanwhile is only queued.

    `release()` lets it go; `release(steps=1)` lets it schedule what was sent while it was held,
    run one step with it (a new request's prefill and first token), and returns once it is held
    again after that step (the next `release()` lets it go for good). Deterministic: no sleeps.
    """

    def __init__(self, engine) -> None:  # noqa: ANN001
        self.engine = engine
        self._gate = threading.Event()
        self._then: dict[int, threading.Event] = {}
        self._held: dict[int, threading.Event] = {id(self._gate): threading.Event()}
        gate = self._gate
        engine.call(lambda: self._wait(gate))
        self._held[id(gate)].wait(120)

    def _wait(self, gate: threading.Event) -> None:
        self._held[id(gate)].set()
        gate.wait(120)
        after = self._then.pop(id(gate), None)
        if after is not None:  # queued from the engine thread: runs after this iteration's step
            self.engine.call(lambda: self._wait(after))

    def release(self, steps: int | None = None) -> None:
        if steps not in (None, 1):
            raise ValueError("release() or release(steps=1)")
        gate = self._gate
        if steps == 1:
            after = threading.Event()
            self._held[id(after)] = threading.Event()
            self._gate = self._then[id(gate)] = after
        gate.set()
        if steps == 1 and not self._held[id(after)].wait(120):
            raise AssertionError("the engine did not come back to the hold")

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self._gate.set()


class ServeProcess:
    """`python -m loramux.cli serve` with JSON logs; stdout and stderr go to files
    (a full pipe would block the server)."""

    def __init__(self, model: Path, tmp: Path, *extra: str, compile: bool = False) -> None:
        self.out, self.err = tmp / "stdout", tmp / "stderr"
        env = {**os.environ, "PYTHONPATH": str(REPO / "server")}
        cmd = [
            sys.executable,
            "-m",
            "loramux.cli",
            "serve",
            "--model",
            str(model),
            "--store",
            str(tmp / "store"),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--device",
            "cpu",
            "--log-format",
            "json",
            "--lora-path",
            LORA_PATH,
            *([] if compile else ["--no-compile"]),
            *extra,
        ]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=tmp)
        started = lambda: self.proc.poll() is not None or self._addresses() is not None  # noqa: E731
        wait_until(started, "listening lines", timeout=180)
        assert self.proc.poll() is None, self.err.read_text()
        self.grpc_port, self.metrics_port = self._addresses()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.gen = pb_grpc.GenerationStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)

    def _addresses(self) -> tuple[int, int] | None:
        text = self.out.read_text()
        g = re.search(r"^grpc listening on \S+:(\d+)$", text, re.M)
        m = re.search(r"^metrics listening on \S+:(\d+)$", text, re.M)
        return (int(g.group(1)), int(m.group(1))) if g and m else None

    def json_lines(self) -> list[dict]:
        return [json.loads(ln) for ln in self.err.read_text().splitlines() if ln.strip()]

    def kill(self) -> None:
        """SIGKILL: no drain, no clean-up, as a crash or the OOM killer would stop it."""
        self.proc.kill()
        self.proc.wait()
        self.channel.close()

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
