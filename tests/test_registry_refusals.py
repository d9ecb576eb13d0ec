"""Every way an upload or a mutation is refused, with its status, through the real gRPC server."""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from registry_helpers import (
    AUTH,
    MAX_MB,
    TOKEN,
    Adapter,
    Code,
    Running,
    assert_store_clean,
    code_of,
    listed,
    put,
    running_server,
    upload,
)
from safetensors.torch import load, save

from loramux.api.adapters import AdaptersService
from loramux.api.auth import AdminAuth
from loramux.api.page_tokens import decode_page_token, encode_page_token
from loramux.v1 import loramux_pb2 as pb


@pytest.fixture(scope="module")
def srv(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    yield from running_server(tiny_llama_dir, tmp_path_factory.mktemp("refusals"))


def tamper(a: Adapter, edit) -> bytes:  # noqa: ANN001
    tensors = load(a.weights)
    edit(tensors)
    return save(tensors)


class Evil:
    """Unpickling this creates a directory: proof that a pickle payload never gets unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (str(self.marker),))


def _refusals(a: Adapter, other: Adapter, marker: Path) -> dict[str, tuple[str, str, bytes, dict, Code]]:
    def nan(t: dict) -> None:
        next(v for k, v in t.items() if "lora_B" in k)[0, 0] = float("nan")

    def wrong_shape(t: dict) -> None:
        k = next(k for k in t if "lora_A" in k)
        t[k] = t[k][:, :32].contiguous()

    pickled = io.BytesIO()
    torch.save({"w": torch.zeros(2), "evil": Evil(marker)}, pickled)
    cfg = json.loads(a.config)
    no_match_cfg = json.dumps({**cfg, "target_modules": ["zz_proj"]})
    no_match = save({k.replace("q_proj", "zz_proj"): v for k, v in load(a.weights).items() if "q_proj" in k})
    limit = int(MAX_MB * 1024 * 1024)
    ok = ("ok-id", a.config, a.weights, {})
    return {
        "checksum": (*ok[:3], {"sha": "0" * 64}, Code.INVALID_ARGUMENT),
        "id-dotdot": ("../x", *ok[1:], Code.INVALID_ARGUMENT),
        "id-slash": ("a/b", *ok[1:], Code.INVALID_ARGUMENT),
        "id-empty": ("", *ok[1:], Code.INVALID_ARGUMENT),
        "id-too-long": ("x" * 129, *ok[1:], Code.INVALID_ARGUMENT),
        "pickle": ("pickled", a.config, pickled.getvalue(), {}, Code.INVALID_ARGUMENT),
        "garbage-config": ("garbage", "{not json", a.weights, {}, Code.INVALID_ARGUMENT),
        "config-not-adapter": ("garbage2", '{"hello": 1}', a.weights, {}, Code.INVALID_ARGUMENT),
        "other-base-model": ("other", other.config, other.weights, {}, Code.INVALID_ARGUMENT),
        "matches-no-module": ("nomatch", no_match_cfg, no_match, {}, Code.INVALID_ARGUMENT),
        "wrong-shape": ("shape", a.config, tamper(a, wrong_shape), {}, Code.INVALID_ARGUMENT),
        "nan": ("nan", a.config, tamper(a, nan), {}, Code.INVALID_ARGUMENT),
        "short-stream": ("short", a.config, a.weights[:-10], {"size": len(a.weights)}, Code.INVALID_ARGUMENT),
        "long-stream": ("long", a.config, a.weights + b"x", {"size": len(a.weights)}, Code.INVALID_ARGUMENT),
        "oversize-manifest": ("big", a.config, b"", {"size": limit + 1}, Code.RESOURCE_EXHAUSTED),
        "oversize-stream": (
            "big2",
            a.config,
            b"\0" * (limit + 1),
            {"size": limit, "chunk": 64 << 10},
            Code.RESOURCE_EXHAUSTED,
        ),
        "no-token": (*ok[:3], {"metadata": None}, Code.UNAUTHENTICATED),
        "not-bearer": (*ok[:3], {"metadata": [("authorization", TOKEN)]}, Code.UNAUTHENTICATED),
        "wrong-token": (*ok[:3], {"metadata": [("authorization", "Bearer nope")]}, Code.PERMISSION_DENIED),
    }


def test_every_refusal_has_its_status(srv: Running, made: dict[str, Adapter], tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    before = listed(srv)
    for name, (adapter_id, config, data, kw, code) in _refusals(made["a"], made["other-base"], marker).items():
        with pytest.raises(grpc.RpcError) as e:
            upload(srv.s.adapters, adapter_id, config, data, **kw)
        assert e.value.code() == code, (name, e.value.details())
    assert not marker.exists()
    assert listed(srv) == before
    assert_store_clean(srv.store)


def test_stream_must_start_with_a_manifest(srv: Running) -> None:
    stub = srv.s.adapters
    assert (
        code_of(stub.UploadAdapter, iter([pb.UploadAdapterRequest(chunk=b"x")]), metadata=AUTH) == Code.INVALID_ARGUMENT
    )
    assert code_of(stub.UploadAdapter, iter([]), metadata=AUTH) == Code.INVALID_ARGUMENT


def test_oversize_manifest_is_refused_before_any_chunk(srv: Running, made: dict[str, Adapter]) -> None:
    release = threading.Event()

    def messages() -> Iterator[pb.UploadAdapterRequest]:
        yield pb.UploadAdapterRequest(
            manifest=pb.AdapterManifest(
                adapter_id="huge", config_json=made["a"].config, weights_sha256="0" * 64, weights_size=10 << 30
            )
        )
        release.wait(120)  # the client would now stream 10 GiB; the server must not wait for it
        yield pb.UploadAdapterRequest(chunk=b"x")

    try:  # a server that waited for chunks would see none before the call's deadline: DEADLINE_EXCEEDED
        assert code_of(srv.s.adapters.UploadAdapter, messages(), metadata=AUTH, timeout=30) == Code.RESOURCE_EXHAUSTED
    finally:
        release.set()


def test_mutations_need_the_token(srv: Running, made: dict[str, Adapter]) -> None:
    put(srv, "guarded", made["a"])
    stub = srv.s.adapters
    for call, req in (
        (stub.DeleteAdapter, pb.DeleteAdapterRequest(adapter_id="guarded")),
        (stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="guarded")),
        (stub.UnloadAdapter, pb.UnloadAdapterRequest(adapter_id="guarded")),
    ):
        assert code_of(call, req) == Code.UNAUTHENTICATED
        assert code_of(call, req, metadata=[("authorization", "Bearer " + TOKEN + "x")]) == Code.PERMISSION_DENIED
    assert "guarded" in listed(srv)  # reads need no token


# ---- units: the token check and the service before the model is loaded -----------------


def test_admin_auth_rules(tmp_path: Path) -> None:
    auth = AdminAuth.from_file(_write(tmp_path / "t", " tök3n \n"))
    assert auth.refusal([("authorization", "Bearer tök3n")]) is None
    assert auth.refusal([("Authorization", "bearer  tök3n ")]) is None
    assert auth.refusal([])[0] == Code.UNAUTHENTICATED
    assert auth.refusal([("authorization", "Basic tök3n")])[0] == Code.UNAUTHENTICATED
    assert auth.refusal([("authorization", "Bearer tok3n")])[0] == Code.PERMISSION_DENIED
    assert AdminAuth.from_file(None).refusal([]) is None
    with pytest.raises(ValueError):
        AdminAuth.from_file(_write(tmp_path / "empty", "\n"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise _Aborted(details)


def test_unavailable_until_attached() -> None:
    service = AdaptersService(AdminAuth(None), 1 << 20)
    ctx = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(service.GetAdapter(pb.GetAdapterRequest(adapter_id="x"), ctx))
    assert ctx.code == Code.UNAVAILABLE


def test_page_tokens_round_trip() -> None:
    assert decode_page_token(encode_page_token("a.b-c_9")) == "a.b-c_9"
    assert decode_page_token("") == ""
    for bad in ("garbage!", encode_page_token("x")[:-1] + "%", "djE6Li4veA"):  # the last is "v1:../x"
        assert decode_page_token(bad) is None
