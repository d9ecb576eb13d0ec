"""`make demo`: serve the demo model, upload its two LoRAs through the API, complete one prompt three ways.

The demo model and its adapters (server/loramux/demo/, made by scripts/train_demo.py
from Python's own documentation and standard library source) are small, so their text
is rough, but it is text: the base model writes a mix, `python-code` writes Python,
`english-prose` writes documentation prose. The three requests are sent together, so
the engine runs them in the same batches.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramux.model import demo_adapter_dirs
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

PROMPT = "The value of"
CLI = [sys.executable, "-m", "loramux.cli"]


def start_server(store: Path) -> tuple[subprocess.Popen, str]:
    ports = ["--port", "0", "--metrics-port", "0", "--http-port", "0"]  # free ports: never clash with a running server
    cmd = [*CLI, "serve", "--model", "demo", *ports, "--store", str(store)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while True:
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            raise SystemExit(f"server did not start (exit code {proc.poll()})")
        if line.startswith("grpc listening on "):
            # Keep reading the server's log so a full pipe never blocks it.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line.split()[-1]


def shown(path: Path) -> Path:
    """`path` relative to the current directory when it is under it (as a user would type it)."""
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def wait_serving(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for _ in range(3000):
        try:
            if stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise SystemExit("server never became SERVING")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="loramux-demo-") as tmp:
        proc, addr = start_server(Path(tmp))
        print(f"server up on {addr} (demo model)")
        try:
            with grpc.insecure_channel(addr) as ch:
                wait_serving(ch)
                for name, path in demo_adapter_dirs().items():
                    print(f"$ loramux upload {shown(path)} --id {name}", flush=True)
                    subprocess.run([*CLI, "upload", str(path), "--id", name, "--server", addr], check=True)
                gen = pb_grpc.GenerationStub(ch)
                params = pb.SamplingParams(
                    max_new_tokens=60, temperature=0.7, top_p=0.9, seed=1, repetition_penalty=1.15, ignore_eos=True
                )
                adapters = ["", *demo_adapter_dirs()]
                print(f"\n== one prompt, base model and each adapter, sent together: {PROMPT!r}\n")
                with ThreadPoolExecutor(len(adapters)) as pool:
                    futures = [
                        pool.submit(gen.Generate, pb.GenerateRequest(adapter_id=a, prompt=PROMPT, params=params))
                        for a in adapters
                    ]
                    outs = [f.result() for f in futures]
                for a, r in zip(adapters, outs):
                    print(f"--- {a or 'base model'} ---")
                    print("\n".join(line.rstrip() for line in textwrap.indent(PROMPT + r.text, "    ").splitlines()))
                    print()
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            print(f"server stopped (exit code {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
