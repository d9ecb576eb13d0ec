"""The Adapters service through the real gRPC server: upload, generate, list, get, overwrite, delete, load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import Hold, wait_until
from registry_helpers import (
    AUTH,
    PROMPT,
    Adapter,
    Code,
    Running,
    assert_store_clean,
    code_of,
    generate,
    listed,
    put,
    running_server,
)

from loramux.v1 import loramux_pb2 as pb


@pytest.fixture(scope="module")
def srv(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    yield from running_server(tiny_llama_dir, tmp_path_factory.mktemp("registry"))


# ---- upload, generate, get, list -------------------------------------------------


def test_upload_then_generate_equals_peft(srv: Running, made: dict[str, Adapter]) -> None:
    a = made["a"]
    got = put(srv, "lora-a", a)
    assert (got.adapter_id, got.adapter_type, got.rank, got.sha256) == ("lora-a", "lora", 4, a.sha256)
    assert got.size_bytes == len(a.weights) and got.state == pb.ADAPTER_STATE_STORED and not got.pinned
    assert got.target_modules and all(t.endswith(("q_proj", "v_proj")) for t in got.target_modules)
    assert abs(got.created_unix_ms - time.time() * 1000) < 60_000
    assert generate(srv, "lora-a", 10) == a.greedy(10) != generate(srv, "", 10)
    now = srv.s.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id="lora-a"))
    assert now.state == pb.ADAPTER_STATE_DEVICE and now.created_unix_ms == got.created_unix_ms


def test_list_pages_and_get(srv: Running, made: dict[str, Adapter]) -> None:
    for i in range(5):
        put(srv, f"page-{i}", made["a"], chunk=4096)
    want = sorted(listed(srv))
    seen, token, pages = [], "", 0
    while True:
        resp = srv.s.adapters.ListAdapters(pb.ListAdaptersRequest(page_size=2, page_token=token))
        assert len(resp.adapters) <= 2
        seen += [m.adapter_id for m in resp.adapters]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert seen == want and pages == (len(want) + 1) // 2 and {f"page-{i}" for i in range(5)} <= set(seen)
    g = srv.s.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id="page-3"))
    assert (g.adapter_type, g.rank, g.size_bytes, g.sha256) == ("lora", 4, len(made["a"].weights), made["a"].sha256)
    assert code_of(srv.s.adapters.ListAdapters, pb.ListAdaptersRequest(page_token="garbage!")) == Code.INVALID_ARGUMENT
    assert code_of(srv.s.adapters.GetAdapter, pb.GetAdapterRequest(adapter_id="nope")) == Code.NOT_FOUND
    assert code_of(srv.s.adapters.GetAdapter, pb.GetAdapterRequest(adapter_id="../x")) == Code.INVALID_ARGUMENT


# ---- overwrite, cancel, delete, load/unload, concurrency -----------------------------


def test_overwrite_serves_new_weights_at_once(srv: Running, made: dict[str, Adapter]) -> None:
    a, b = made["a"], made["b"]
    put(srv, "ow", a)
    assert code_of(put, srv, "ow", b) == Code.ALREADY_EXISTS
    srv.s.adapters.LoadAdapter(pb.LoadAdapterRequest(adapter_id="ow", pin=True), metadata=AUTH)
    assert generate(srv, "ow", 8) == a.greedy(8)  # the old weights are on the device, pinned
    # A request running across the overwrite finishes on the weights it started with.
    n = 200
    engine = srv.s.engine
    hold = Hold(engine)  # held, so the long request is still running when the overwrite lands
    long = srv.s.gen.GenerateStream(
        pb.GenerateRequest(
            adapter_id="ow", prompt_token_ids=PROMPT, params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True)
        )
    )
    wait_until(lambda: engine.num_waiting == 1, "the long request to be queued")
    hold.release(steps=1)  # its prefill and first token; then held again
    received = [list(next(long).token_ids)]
    done: list[pb.Adapter] = []
    uploader = threading.Thread(target=lambda: done.append(put(srv, "ow", b, overwrite=True)))
    uploader.start()
    # The store swaps at once; dropping the cached old weights waits for the (held) engine.
    wait_until(lambda: srv.s.server.store.get("ow").sha256 == b.sha256, "the overwrite to be published")
    assert engine.num_running == 1  # the long request runs across the overwrite
    hold.release()
    uploader.join(120)
    assert done and done[0].sha256 == b.sha256
    assert generate(srv, "ow", 8) == b.greedy(8)
    received.extend(list(m.token_ids) for m in long)
    assert [t for ids in received for t in ids] == a.greedy(n)
    now = srv.s.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id="ow"))
    assert now.sha256 == b.sha256 and now.pinned and now.state == pb.ADAPTER_STATE_DEVICE  # the pin carried over
    srv.s.adapters.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="ow"), metadata=AUTH)


def test_client_dying_mid_upload_leaves_nothing(srv: Running, made: dict[str, Adapter]) -> None:
    a = made["a"]
    sent, release = threading.Event(), threading.Event()

    def messages() -> Iterator[pb.UploadAdapterRequest]:
        yield pb.UploadAdapterRequest(
            manifest=pb.AdapterManifest(
                adapter_id="dies", config_json=a.config, weights_sha256=a.sha256, weights_size=len(a.weights)
            )
        )
        for i in range(3):
            yield pb.UploadAdapterRequest(chunk=a.weights[i * 1024 : (i + 1) * 1024])
        sent.set()
        release.wait(30)

    fut = srv.s.adapters.UploadAdapter.future(messages(), metadata=AUTH, timeout=60)
    assert sent.wait(30)
    staging = srv.store / ".staging"
    deadline = time.monotonic() + 10
    while not any(staging.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any(staging.iterdir())  # the upload really was in progress
    fut.cancel()
    release.set()
    assert_store_clean(srv.store)
    assert "dies" not in listed(srv)
    assert code_of(generate, srv, "dies") == Code.NOT_FOUND
    assert put(srv, "dies", a).sha256 == a.sha256


def test_delete(srv: Running, made: dict[str, Adapter]) -> None:
    put(srv, "doomed", made["a"])
    assert generate(srv, "doomed", 4) == made["a"].greedy(4)
    srv.s.adapters.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="doomed"), metadata=AUTH)
    assert code_of(srv.s.adapters.GetAdapter, pb.GetAdapterRequest(adapter_id="doomed")) == Code.NOT_FOUND
    assert code_of(generate, srv, "doomed") == Code.NOT_FOUND
    assert (
        code_of(srv.s.adapters.DeleteAdapter, pb.DeleteAdapterRequest(adapter_id="doomed"), metadata=AUTH)
        == Code.NOT_FOUND
    )
    assert not (srv.store / "doomed").exists()


def test_load_pin_and_unload(srv: Running, made: dict[str, Adapter]) -> None:
    put(srv, "ld", made["a"])
    stub = srv.s.adapters
    m = stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="ld", pin=True), metadata=AUTH)
    assert m.state == pb.ADAPTER_STATE_DEVICE and m.pinned
    assert (  # this server runs with the merged cache off (--merged-cache-mb 0); test_merged.py merges
        code_of(stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="ld", merge=True), metadata=AUTH)
        == Code.INVALID_ARGUMENT
    )
    assert code_of(stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="nope"), metadata=AUTH) == Code.NOT_FOUND
    m = stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="ld"), metadata=AUTH)
    assert not m.pinned and m.state == pb.ADAPTER_STATE_HOST
    assert generate(srv, "ld", 4) == made["a"].greedy(4)


def test_concurrent_uploads(srv: Running, made: dict[str, Adapter]) -> None:
    a = made["a"]

    def start(adapter_id: str) -> grpc.Future:
        msgs = [
            pb.UploadAdapterRequest(
                manifest=pb.AdapterManifest(
                    adapter_id=adapter_id, config_json=a.config, weights_sha256=a.sha256, weights_size=len(a.weights)
                )
            )
        ]
        msgs += [pb.UploadAdapterRequest(chunk=a.weights[i : i + 512]) for i in range(0, len(a.weights), 512)]
        return srv.s.adapters.UploadAdapter.future(iter(msgs), metadata=AUTH, timeout=120)

    futures = [start(f"many-{i}") for i in range(4)] + [start("same"), start("same")]
    for f in futures[:4]:
        assert f.result().sha256 == a.sha256
    outcomes = []
    for f in futures[4:]:
        try:
            outcomes.append(f.result().adapter_id)
        except grpc.RpcError as e:
            outcomes.append(e.code())
    assert sorted(map(str, outcomes)) == sorted(["same", str(Code.ALREADY_EXISTS)])
    assert {f"many-{i}" for i in range(4)} | {"same"} <= set(listed(srv))


# ---- restart (last: it replaces the module's server) --------------------------------------


def test_restart_keeps_everything(srv: Running, made: dict[str, Adapter]) -> None:
    def snapshot() -> list[tuple]:
        resp = srv.s.adapters.ListAdapters(pb.ListAdaptersRequest(page_size=1000))
        return [
            (m.adapter_id, m.adapter_type, m.rank, m.sha256, m.size_bytes, m.created_unix_ms, tuple(m.target_modules))
            for m in resp.adapters
        ]

    before = snapshot()
    assert len(before) >= 10
    srv.s.stop()
    assert_store_clean(srv.store)
    srv.s = srv.start()
    assert snapshot() == before
    assert generate(srv, "lora-a", 6) == made["a"].greedy(6)
    assert generate(srv, "ow", 6) == made["b"].greedy(6)
    assert_store_clean(srv.store)
