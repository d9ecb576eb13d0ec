"""`loramux upload` and `loramux adapters ...` as subprocesses against a real server; TLS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import ServerThread
from registry_helpers import (
    SERVER_DIR,
    TOKEN,
    Adapter,
    Code,
    Running,
    code_of,
    listed,
    running_server,
    self_signed,
    upload,
)

from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def srv(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    yield from running_server(tiny_llama_dir, tmp_path_factory.mktemp("cli"))


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if k != "LORAMUX_ADMIN_TOKEN"}
    full_env = {**inherited, "PYTHONPATH": str(SERVER_DIR), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "loramux.cli", *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_cli_upload_list_get_delete(srv: Running, made: dict[str, Adapter]) -> None:
    server = ["--server", srv.s.address]
    r = cli("upload", str(made["a"].path), "--id", "cli-a", *server, "--admin-token-file", str(srv.token_file))
    assert r.returncode == 0, r.stderr
    assert "cli-a" in r.stdout
    r = cli("upload", str(made["a"].path), "--id", "cli-b", *server)
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
    r = cli("adapters", "list", "--json", "--page-size", "3", *server)
    assert r.returncode == 0, r.stderr
    assert [m["adapter_id"] for m in json.loads(r.stdout)] == sorted(listed(srv))
    r = cli("adapters", "get", "cli-a", "--json", *server)
    got = json.loads(r.stdout)
    assert (got["sha256"], got["adapter_type"], got["rank"], got["pinned"]) == (made["a"].sha256, "lora", 4, False)
    env = {"LORAMUX_ADMIN_TOKEN": TOKEN}
    r = cli("adapters", "load", "cli-a", "--pin", *server, env=env)
    assert r.returncode == 0 and "device" in r.stdout, r.stderr
    assert cli("adapters", "delete", "cli-a", *server, env=env).returncode == 0
    r = cli("adapters", "get", "cli-a", *server)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


def test_tls(tiny_llama_dir: Path, made: dict[str, Adapter], srv: Running, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with ServerThread(
        tiny_llama_dir, store=tmp_path / "store", admin_token_file=srv.token_file, tls_cert=cert, tls_key=key
    ) as s:
        a = made["a"]
        with grpc.secure_channel(s.address, grpc.ssl_channel_credentials(cert.read_bytes())) as ch:
            got = upload(pb_grpc.AdaptersStub(ch), "tls-a", a.config, a.weights)
            assert got.sha256 == a.sha256
        assert code_of(s.adapters.ListAdapters, pb.ListAdaptersRequest(), timeout=5) == Code.UNAVAILABLE  # plaintext
        r = cli("adapters", "list", "--server", s.address, "--tls-ca", str(cert))
        assert r.returncode == 0 and "tls-a" in r.stdout, r.stderr
