"""kill -9 during uploads and overwrites, then a restart on the same store.

A real `loramux serve` process is killed with SIGKILL at points chosen by state, never by
time: while two uploads are open on the server (a new id and an overwrite, each with its
manifest and first chunk received and its staging file created), and right after an
overwrite has returned. After each restart the store holds exactly the adapters whose upload
returned, each with the weights of its last completed upload (its output equals PEFT's on
those weights), and nothing is left in staging or trash.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import ServeProcess, wait_until
from registry_helpers import AUTH, PROMPT, TOKEN, Adapter, assert_store_clean, make_adapters, upload

from loramux.v1 import loramux_pb2 as pb

SERVING = health_pb2.HealthCheckResponse.SERVING


def start(model: Path, tmp: Path, token: Path, procs: list[ServeProcess]) -> ServeProcess:
    """A server on `tmp/store`, SERVING; kept in `procs` (the test closes them all, whatever fails)."""
    p = ServeProcess(model, tmp, "--admin-token-file", str(token), "--max-device-adapters", "2")
    procs.append(p)
    health = health_pb2_grpc.HealthStub(p.channel)

    def serving() -> bool:
        try:
            return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        except grpc.RpcError:
            return False

    wait_until(serving, "SERVING", timeout=180)
    return p


def generate(p: ServeProcess, adapter_id: str, n: int = 8) -> list[int]:
    req = pb.GenerateRequest(
        adapter_id=adapter_id, prompt_token_ids=PROMPT, params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True)
    )
    return list(p.gen.Generate(req, timeout=120).token_ids)


def listed(p: ServeProcess) -> list[str]:
    return sorted(m.adapter_id for m in p.adapters.ListAdapters(pb.ListAdaptersRequest(page_size=100)).adapters)


def held_upload(p: ServeProcess, adapter_id: str, a: Adapter, overwrite: bool, release: threading.Event) -> None:
    """Send the manifest and the first chunk, then keep the stream open until `release`."""

    def messages() -> Iterator[pb.UploadAdapterRequest]:
        manifest = pb.AdapterManifest(
            adapter_id=adapter_id, config_json=a.config, weights_sha256=hashlib.sha256(a.weights).hexdigest(),
            weights_size=len(a.weights), overwrite=overwrite,
        )  # fmt: skip
        yield pb.UploadAdapterRequest(manifest=manifest)
        yield pb.UploadAdapterRequest(chunk=a.weights[:1024])
        release.wait(300)

    try:
        p.adapters.UploadAdapter(messages(), metadata=AUTH, timeout=300)
    except grpc.RpcError:
        pass  # the server was killed under it: that is the point


def open_uploads(store: Path) -> int:
    """Staging directories with their weights file opened (the manifest accepted, chunks arriving)."""
    staging = store / ".staging"
    return sum(any(d.glob("*.safetensors")) for d in staging.iterdir()) if staging.is_dir() else 0


def test_kill_9_during_uploads_and_overwrites(tiny_llama_dir: Path, tmp_path: Path) -> None:
    made = make_adapters(tmp_path / "made")
    a, b = made["a"], made["b"]
    want = {"a": a.greedy(8), "b": b.greedy(8)}
    assert want["a"] != want["b"]
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    store = tmp_path / "store"

    procs: list[ServeProcess] = []
    try:
        crash_and_restart(tiny_llama_dir, tmp_path, token, store, a, b, want, procs)
    finally:  # whatever failed, no server outlives the test
        for p in procs:
            p.close()


def crash_and_restart(model: Path, tmp_path: Path, token: Path, store: Path, a: Adapter, b: Adapter,
                      want: dict[str, list[int]], procs: list[ServeProcess]) -> None:  # fmt: skip
    # 1. Two published adapters; then a new id and an overwrite, both open on the server, and SIGKILL.
    p = start(model, tmp_path, token, procs)
    upload(p.adapters, "x", a.config, a.weights)
    upload(p.adapters, "keep", b.config, b.weights)
    assert generate(p, "x") == want["a"]
    release = threading.Event()
    senders = [
        threading.Thread(target=held_upload, args=(p, "new", a, False, release)),
        threading.Thread(target=held_upload, args=(p, "x", b, True, release)),
    ]
    for t in senders:
        t.start()
    try:
        wait_until(lambda: open_uploads(store) == 2, "both uploads open on the server")
        p.kill()
    finally:
        release.set()
        for t in senders:
            t.join(60)
    assert open_uploads(store) == 2  # the crash left them behind

    # 2. Restart: exactly the published two, with their published weights; the half uploads are gone.
    p = start(model, tmp_path, token, procs)
    assert listed(p) == ["keep", "x"]
    assert generate(p, "x") == want["a"]
    assert generate(p, "keep") == want["b"]
    assert_store_clean(store)
    # An overwrite that returned, then SIGKILL before anything else: it must be durable.
    upload(p.adapters, "x", b.config, b.weights, overwrite=True)
    p.kill()

    # 3. Restart: the overwrite holds.
    p = start(model, tmp_path, token, procs)
    assert listed(p) == ["keep", "x"]
    assert generate(p, "x") == want["b"]
    assert generate(p, "keep") == want["b"]
    assert_store_clean(store)
