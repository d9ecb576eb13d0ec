"""The HTTP API's refusals (OpenAI's error body and status), its keys, vLLM's adapter loading from an
allowed directory, and what a disconnecting client frees. The engine is held with `harness.Hold` where
a test needs requests to wait, never with sleeps."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket

import httpx
import openai
import pytest
from harness import Hold
from http_helpers import ADMIN_TOKEN, API_KEY, SERVED, base_url, client, http_server, scrape
from test_operations import wait_for

from loramux.v1 import loramux_pb2 as pb

MAX_QUEUE = 6


@pytest.fixture(scope="module")
def server(chat_llama_dir, made, tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("http-errors")
    with http_server(chat_llama_dir, root, {"a": made["a"].path}, max_queue=MAX_QUEUE) as s:
        s.root = root
        yield s


@pytest.fixture(scope="module")
def oai(server):  # noqa: ANN001, ANN201
    with client(server) as c:
        yield c


def post(server, path: str, body: dict, token: str | None = API_KEY) -> httpx.Response:  # noqa: ANN001
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(base_url(server) + path, json=body, headers=headers, timeout=120)


def assert_openai_error(r: httpx.Response, status: int, words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert words in err["message"], err["message"]
    return err


@pytest.mark.parametrize("body, words, param", [
    ({"temperature": -1}, "temperature must be", "temperature"),
    ({"top_p": 2}, "top_p must be in (0, 1]", "top_p"),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0", "top_p"),  # not "unset", as 0 is in the contract
    ({"n": 0}, "n:", "n"),
    ({"max_tokens": 100000}, "exceeds the model's context", "max_tokens"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias is not supported", "logit_bias"),
    ({"logprobs": 2}, "alternative tokens are not supported", None),
    ({"prompt": [999999]}, "out of the vocabulary", "prompt"),
    ({"prompt": ""}, "prompt is empty", "prompt"),
    ({"top_k": -5}, "top_k", "top_k"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5", "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3", "frequency_penalty"),
    ({"min_p": 1.5}, "min_p must be in [0, 1] (0 = off), got 1.5", "min_p"),
    ({"min_p": -0.1}, "min_p must be in [0, 1]", "min_p"),
    ({"repetition_penalty": -1}, "repetition_penalty must be a finite number > 0", "repetition_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0", "repetition_penalty"),
])  # fmt: skip
def test_bad_parameters_are_400(server, body: dict, words: str, param: str | None) -> None:
    err = assert_openai_error(post(server, "/v1/completions", {"model": SERVED, "prompt": "x", **body}), 400, words)
    assert err["type"] == "BadRequestError"
    assert err["param"] == param


def test_nan_is_refused_not_taken_as_off(server) -> None:
    for name in ("min_p", "presence_penalty", "temperature"):
        raw = f'{{"model": "{SERVED}", "prompt": "x", "max_tokens": 2, "{name}": NaN}}'
        r = httpx.post(base_url(server) + "/v1/completions", content=raw, timeout=120,
                       headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})  # fmt: skip
        assert assert_openai_error(r, 400, f"{name} must be")["param"] == name


def test_bad_penalties_are_bad_request_errors_in_the_client(oai) -> None:
    """The official client raises BadRequestError for values the gRPC API refuses too (one validation)."""
    for extra in ({"min_p": 2.0}, {"repetition_penalty": -0.5}):
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model=SERVED, prompt="x", max_tokens=2, extra_body=extra)
        assert e.value.body["param"] == next(iter(extra))
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                    presence_penalty=-2.01)  # fmt: skip
    assert e.value.body["param"] == "presence_penalty" and "presence_penalty must be in [-2, 2]" in e.value.message


def test_the_client_sees_openai_exceptions(server, oai) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert "no-such-adapter" in e.value.message and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "x"}], temperature=-0.5)
    with pytest.raises(openai.BadRequestError):  # not even a body the schema accepts
        oai.chat.completions.create(model=SERVED, messages=[], max_tokens=2)
    assert_openai_error(post(server, "/v1/nowhere", {}), 404, "Not Found")


def test_a_model_without_a_chat_template_is_400(tiny_llama_dir, tmp_path) -> None:
    with http_server(tiny_llama_dir, tmp_path, {}) as s, client(s) as c:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert "no chat template" in e.value.message
        assert c.completions.create(model=SERVED, prompt="still serving", max_tokens=2).choices[0].text is not None


def test_the_api_key_is_enforced(server) -> None:
    body = {"model": SERVED, "prompt": "x", "max_tokens": 2}
    for token in (None, "wrong-key", ADMIN_TOKEN):
        err = assert_openai_error(post(server, "/v1/completions", body, token), 401, "API key")
        assert err["type"] == "AuthenticationError"
    with client(server, key="wrong") as bad, pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(base_url(server) + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(base_url(server) + "/health", timeout=30).status_code == 200  # no key needed
    assert post(server, "/v1/completions", body).status_code == 200


def test_queue_full_is_429(server, oai) -> None:
    gate = Hold(server.engine)
    try:
        req = pb.GenerateRequest(prompt="fill", params=pb.SamplingParams(max_new_tokens=1))
        fillers = [server.gen.Generate.future(req, timeout=120) for _ in range(MAX_QUEUE)]
        wait_for(lambda: server.engine.num_waiting == MAX_QUEUE, what="the queue to fill")
        with pytest.raises(openai.RateLimitError) as e:
            oai.completions.create(model=SERVED, prompt="one too many", max_tokens=2)
        assert "queue is full" in e.value.message
    finally:
        gate.release()
    assert all(f.result(120).generated_tokens == 1 for f in fillers)


def cancelled(server) -> float:  # noqa: ANN001
    return scrape(server).get("loramux_frontend_requests_total", frontend="http", status="cancelled")


def test_a_closed_stream_frees_its_request(server) -> None:
    before = cancelled(server)
    body = {"model": "a", "prompt": "go on", "max_tokens": 500, "stream": True, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", base_url(server) + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:  # fmt: skip
        assert r.status_code == 200
        next(r.iter_lines())  # one event arrived: the request is running
    wait_for(lambda: cancelled(server) == before + 1, what="the cancelled count")
    wait_for(lambda: server.engine.idle, what="the engine to free the request")


def test_a_disconnected_unary_call_frees_its_request(server) -> None:
    before = cancelled(server)
    gate = Hold(server.engine)
    try:
        payload = b'{"model": "tiny-chat", "prompt": "bye", "max_tokens": 4, "temperature": 0}'
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()  # fmt: skip
        with socket.create_connection(("127.0.0.1", server.server.http_port)) as sock:
            sock.sendall(head + payload)
            wait_for(lambda: server.engine.num_waiting == 1, what="the request to be queued")
        # The socket is closed while the engine is held: the server marks the queued request cancelled.
        wait_for(lambda: all(r.cancelled for r in server.engine._inbox), what="the request to be cancelled")
    finally:
        gate.release()
    wait_for(lambda: cancelled(server) == before + 1, what="the cancelled count")
    wait_for(lambda: server.engine.idle, what="the engine to free the request")


def load(server, name: str, path: str, token: str | None = ADMIN_TOKEN) -> httpx.Response:  # noqa: ANN001
    return post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, token)


def test_load_lora_adapter_from_the_allowed_dir(server, oai, made) -> None:
    allowed = server.root / "allowed"
    shutil.copytree(made["b"].path, allowed / "b-dir")
    assert load(server, "b2", str(allowed / "b-dir"), token=API_KEY).status_code == 401  # needs the admin token
    assert load(server, "b2", str(allowed / "b-dir"), token=None).status_code == 401
    r = load(server, "b2", str(allowed / "b-dir"))
    assert r.status_code == 200, r.text
    assert "b2" in {m.id for m in oai.models.list().data}
    got = oai.completions.create(model="b2", prompt=[10, 11, 12], max_tokens=6, temperature=0,
                                 extra_body={"ignore_eos": True})  # fmt: skip
    want = server.gen.Generate(
        pb.GenerateRequest(
            adapter_id="b2", prompt_token_ids=[10, 11, 12], params=pb.SamplingParams(max_new_tokens=6, ignore_eos=True)
        )
    )
    assert list(want.token_ids) == made["b"].greedy(6, [10, 11, 12])  # PEFT's tokens
    assert got.choices[0].text == want.text
    assert_openai_error(load(server, "b2", str(allowed / "b-dir")), 400, "already exists")
    assert load(server, "b3", "b-dir").status_code == 200  # relative to the allowed directory
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "b2"}, ADMIN_TOKEN)
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="b2", prompt="x", max_tokens=2)
    assert_openai_error(post(server, "/v1/unload_lora_adapter", {"lora_name": "b2"}, ADMIN_TOKEN), 404, "b2")


def test_load_lora_adapter_outside_the_allowed_dir_is_refused(server, made, tmp_path) -> None:
    allowed = server.root / "allowed"
    outside = tmp_path / "outside"
    shutil.copytree(made["a"].path, outside)
    os.symlink(outside, allowed / "link-to-outside")
    (allowed / "mixed").mkdir()
    shutil.copy(outside / "adapter_config.json", allowed / "mixed")
    os.symlink(outside / "adapter_model.safetensors", allowed / "mixed" / "adapter_model.safetensors")
    climb = allowed / ".." / ".." / outside.parent.name / outside.name  # out through ".."
    for path in (str(outside), str(allowed / "link-to-outside"), str(climb), "../x", str(allowed / "mixed")):
        assert_openai_error(load(server, "evil", path), 400, "outside the allowed adapter directory")
    assert_openai_error(load(server, "evil", str(allowed / "missing")), 400, "cannot be read")
    assert not (server.config.store / "evil").exists()


def test_a_bad_adapter_gets_the_upload_checks(server, made) -> None:
    bad = server.root / "allowed" / "corrupt"
    shutil.copytree(made["a"].path, bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert_openai_error(load(server, "corrupt", str(bad)), 400, "")
    assert_openai_error(load(server, "../corrupt", str(bad)), 400, "invalid adapter id")
    assert not (server.config.store / "corrupt").exists()
    assert not any(p.name.startswith("corrupt") for p in server.config.store.iterdir())


def test_draining_is_503(tiny_llama_dir, tmp_path) -> None:
    with http_server(tiny_llama_dir, tmp_path, {}) as s:
        gate = Hold(s.engine)
        running = s.gen.Generate.future(pb.GenerateRequest(prompt="x", params=pb.SamplingParams(max_new_tokens=2)))
        wait_for(lambda: s.engine.num_waiting == 1, what="the request to be queued")
        drained = asyncio.run_coroutine_threadsafe(s.server.drain(), s.loop)
        wait_for(lambda: s.server.adapters.draining, what="the drain to start")
        assert_openai_error(post(s, "/v1/completions", {"model": SERVED, "prompt": "late", "max_tokens": 2}), 503,
                            "draining")  # fmt: skip
        assert httpx.get(base_url(s) + "/health", timeout=30).status_code == 503
        gate.release()
        assert running.result(120).generated_tokens == 2
        drained.result(120)
        with pytest.raises(httpx.ConnectError):
            httpx.get(base_url(s) + "/health", timeout=30)
