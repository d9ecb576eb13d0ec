"""The loramux server under test: one the bench starts (a subprocess or a thread), or a running one."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

_LISTEN = re.compile(r"^(grpc|metrics|http) listening on (\S+):(\d+)\s*$")


@dataclass
class ServerSettings:
    model: str
    store: Path
    device: str = "auto"
    dtype: str = "auto"
    max_device_adapters: int = 16
    merged_cache_mb: float = 0.0
    threads: int | None = None  # OMP/MKL threads of a subprocess server
    extra_args: list[str] = field(default_factory=list)  # more `loramux serve` flags, as typed
    # EngineConfig fields by name (kv_cache_mb=64, prefix_caching=False, ...), for either way of spawning
    engine: dict[str, object] = field(default_factory=dict)

    def argv(self) -> list[str]:
        from loramux.config import EngineConfig

        flags: list[str] = []
        for name, value in self.engine.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):  # a switch: --name turns on one that defaults off, --no-name the reverse
                if value != getattr(EngineConfig(), name):
                    flags.append(flag if value else "--no-" + flag[2:])
            else:
                flags += [flag, str(value)]
        return [
            "--model",
            self.model,
            "--store",
            str(self.store),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--device",
            self.device,
            "--dtype",
            self.dtype,
            "--max-device-adapters",
            str(self.max_device_adapters),
            "--merged-cache-mb",
            str(self.merged_cache_mb),
            *flags,
            *self.extra_args,
        ]


class LoramuxTarget:
    """`start()` it, send requests to `address`, read `metrics_text()`, `stop()` it."""

    def __init__(
        self,
        name: str,
        settings: ServerSettings | None = None,
        spawn: str = "subprocess",
        address: str | None = None,
        metrics_url: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        if spawn not in ("subprocess", "thread", "external"):
            raise ValueError(f"spawn must be subprocess, thread or external, got {spawn!r}")
        if (spawn == "external") != (address is not None):
            raise ValueError("a running server (spawn external) needs its address, and only it does")
        self.name = name
        self.settings = settings
        self.spawn = spawn
        self.address = address or ""
        self.metrics_url = metrics_url
        self.http_url: str | None = None  # the OpenAI-compatible API's base URL, where the bench started the server
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None
        self._thread_server = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ---
    def start(self, timeout_s: float = 600.0) -> None:
        if self.spawn == "subprocess":
            self._start_subprocess(timeout_s)
        elif self.spawn == "thread":
            self._start_thread(timeout_s)
        wait_serving(self.address, timeout_s)

    def _start_subprocess(self, timeout_s: float) -> None:
        import loramux

        env = dict(os.environ)
        src = str(Path(loramux.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        if self.settings.threads is not None:  # torch reads these at start-up
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.settings.threads)
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 (lives with the process)
        cmd = [sys.executable, "-m", "loramux.cli", "serve", *self.settings.argv()]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        found: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        while not {"grpc", "metrics"} <= found.keys():  # the http line comes before the metrics line
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server {self.name} exited with {self._proc.wait()} (see {self.log_path})")
            m = _LISTEN.match(line)
            if m:
                found[m.group(1)] = f"{m.group(2)}:{m.group(3)}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {self.name} did not start in {timeout_s:.0f}s")
        self.address = found["grpc"]
        self.metrics_url = f"http://{found['metrics']}/metrics"
        self.http_url = f"http://{found['http']}" if "http" in found else None
        # Keep draining stdout, so a chatty server never blocks on a full pipe.
        threading.Thread(target=self._proc.stdout.read, daemon=True).start()

    def _start_thread(self, timeout_s: float) -> None:
        from loramux.api.server import LoramuxServer
        from loramux.config import EngineConfig, ServerConfig

        s = self.settings
        config = ServerConfig(
            model=s.model,
            store=s.store,
            port=0,
            metrics_port=0,
            http_port=0,
            device=s.device,
            dtype=s.dtype,
            engine=EngineConfig(
                max_device_adapters=s.max_device_adapters, merged_cache_mb=s.merged_cache_mb, **s.engine
            ),
        )
        server = LoramuxServer(config)
        ready = threading.Event()
        errors: list[BaseException] = []
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)

            async def main() -> None:
                try:
                    await server.start()
                except BaseException as e:  # surfaced to start()
                    errors.append(e)
                    ready.set()
                    return
                ready.set()
                await server.wait()

            self._loop.run_until_complete(main())

        threading.Thread(target=run, name=f"bench-server-{self.name}", daemon=True).start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"server {self.name} did not start in {timeout_s:.0f}s")
        if errors:
            raise errors[0]
        self._thread_server = server
        self.address = f"127.0.0.1:{server.port}"
        self.metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        self.http_url = f"http://127.0.0.1:{server.http_port}"

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # SIGTERM: the server drains and exits
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread_server is not None and self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._thread_server.stop(0), self._loop).result(60)
            self._thread_server = None

    # --- what the bench asks of a server ---
    def cpu_seconds(self) -> tuple[float, float] | None:
        """CPU seconds (user + system) the server process has used so far: (all its threads, its main
        thread, which runs the event loop of both APIs). None where the bench did not start it as a
        subprocess, or without Linux's /proc."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        pid = self._proc.pid
        try:
            return _cpu(Path(f"/proc/{pid}/stat")), _cpu(Path(f"/proc/{pid}/task/{pid}/stat"))
        except (OSError, ValueError, IndexError):
            return None

    def metrics_text(self) -> str | None:
        if not self.metrics_url:
            return None
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
                return resp.read().decode()
        except OSError:
            return None

    def load_adapter(self, adapter_id: str, merge: bool = False, pin: bool = False) -> str | None:
        """LoadAdapter over the API; None when it worked, else why not (the server may lack it)."""
        with grpc.insecure_channel(self.address) as ch:
            try:
                pb_grpc.AdaptersStub(ch).LoadAdapter(
                    pb.LoadAdapterRequest(adapter_id=adapter_id, merge=merge, pin=pin), timeout=120
                )
            except grpc.RpcError as e:
                return f"LoadAdapter: {e.code().name}: {e.details()}"
        return None

    def upload(self, directory: Path, adapter_id: str) -> None:
        """UploadAdapter (overwrite) for a server the bench did not start."""
        import hashlib

        config_text = (directory / "adapter_config.json").read_text()
        files = [directory / n for n in ("adapter_model.safetensors", "adapter.safetensors")]
        weights = next(f for f in files if f.is_file()).read_bytes()
        manifest = pb.AdapterManifest(
            adapter_id=adapter_id,
            config_json=config_text,
            weights_sha256=hashlib.sha256(weights).hexdigest(),
            weights_size=len(weights),
            overwrite=True,
        )
        chunks = [pb.UploadAdapterRequest(chunk=weights[i : i + (1 << 20)]) for i in range(0, len(weights), 1 << 20)]
        with grpc.insecure_channel(self.address) as ch:
            pb_grpc.AdaptersStub(ch).UploadAdapter(
                iter([pb.UploadAdapterRequest(manifest=manifest), *chunks]), timeout=300
            )


def _cpu(stat: Path) -> float:
    """utime + stime of a /proc stat file (fields 14 and 15; the name before them may hold spaces), in seconds."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_serving(address: str, timeout_s: float) -> None:
    """Until the standard health service says SERVING (the model is loaded and warmed up)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} is not SERVING after {timeout_s:.0f}s")
            time.sleep(0.2)
