"""The server's life, end to end: request logs, health while loading, graceful drain (in
process, with the engine held, so a stream is surely running while the drain refuses new
work; and on SIGTERM/SIGINT of a real `loramux serve` process).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from harness import Hold, ServeProcess, ServerThread, wait_until
from ops_helpers import MAX_LABELS, NOT_SERVING, SERVING, greedy, health, scrape, try_health, wait_for

import loramux.api.server as server_mod
from loramux import logs
from loramux.api.server import LoramuxServer
from loramux.config import EngineConfig, ServerConfig
from loramux.logs import setup_logging
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[ServerThread]:
    with ServerThread(tiny_llama_dir, max_running=8, metrics_max_adapter_labels=MAX_LABELS) as s:
        s.initial = scrape(s.server.metrics_port)  # before any client request
        yield s


# ---- logs (in process; the JSON lines of a real process are checked below) ----------


@pytest.fixture
def log_stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    monkeypatch.setattr(logs, "_log_prompts", False)
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    yield io.StringIO()
    for h in list(root.handlers):
        if h not in saved[1]:
            root.removeHandler(h)
    root.setLevel(saved[0])


def request_lines(stream: io.StringIO) -> list[dict]:
    return [ln for ln in map(json.loads, stream.getvalue().splitlines()) if ln["logger"] == "loramux.request"]


@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompt_text_only_with_log_prompts(server: ServerThread, log_stream: io.StringIO, log_prompts: bool) -> None:
    setup_logging("json", stream=log_stream, log_prompts=log_prompts)
    server.gen.Generate(
        pb.GenerateRequest(prompt="zebra secret", request_id="lp-1", params=pb.SamplingParams(max_new_tokens=2)),
        timeout=60,
    )
    (line,) = [ln for ln in request_lines(log_stream) if ln["request_id"] == "lp-1"]
    assert line["status"] == "ok" and line["prompt_tokens"] == len(b"zebra secret")
    assert ("zebra secret" in log_stream.getvalue()) is log_prompts
    if log_prompts:
        assert line["prompt"] == "zebra secret"


# ---- health while loading ---------------------------------------------------------------


def test_not_serving_until_loaded_and_warmed(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gate = threading.Event()
    real_load = server_mod.load_base_model

    def gated_load(*args: object) -> object:  # holds the model load until the test has looked
        gate.wait(60)
        return real_load(*args)

    monkeypatch.setattr(server_mod, "load_base_model", gated_load)
    srv = LoramuxServer(ServerConfig(model=str(tiny_llama_dir), store=tmp_path, port=0, metrics_port=0, device="cpu",
                                     engine=EngineConfig(compile=False)))  # fmt: skip
    loop = asyncio.new_event_loop()

    async def run() -> None:
        try:
            await srv.start()
            await srv.wait()
        finally:
            await srv.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        wait_for(lambda: srv.port != 0, what="the gRPC port")
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            wait_for(lambda: try_health(ch) == NOT_SERVING, what="NOT_SERVING while loading")
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(prompt="x"), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            gate.set()
            wait_for(lambda: health(ch) == SERVING, timeout=120, what="SERVING after warm-up")
            assert srv.engine is not None and srv.engine.steps >= 1  # the warm-up forward ran first
    finally:
        gate.set()
        asyncio.run_coroutine_threadsafe(srv.drain(), loop).result(60)
        thread.join(30)


# ---- a real `loramux serve` process: SIGTERM / SIGINT --------------------------------


@pytest.fixture
def serve_process(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(*extra: str) -> ServeProcess:
        started.append(ServeProcess(tiny_llama_dir, tmp_path, *extra))
        return started[-1]

    yield start
    for p in started:
        p.close()


def test_drain_refuses_new_work_while_a_stream_runs_then_finishes_it(
    tiny_llama_dir: Path, log_stream: io.StringIO
) -> None:
    """The drain the stop signals start, in process: the engine is held with a 300-token stream
    running, so it is surely still running while the drain refuses new requests and uploads
    (however fast the machine); released, the stream gets all its tokens and the drain ends."""
    setup_logging("json", stream=log_stream)
    with ServerThread(tiny_llama_dir, drain_timeout=120) as s, Hold(s.engine) as hold:
        stream = s.gen.GenerateStream(greedy([7, 8, 9], 300, request_id="drain-stream"), timeout=300)
        wait_until(lambda: s.engine.num_waiting == 1, "the stream to be queued")
        hold.release(steps=1)  # its prefill and first token; then held again
        messages = [next(stream)]
        drained = asyncio.run_coroutine_threadsafe(s.server.drain(), s.loop)
        # Health turns NOT_SERVING only after admission stopped, so the next request must be refused.
        wait_until(lambda: health(s.channel) == NOT_SERVING, "NOT_SERVING while draining")
        assert s.engine.num_running == 1 and not drained.done()  # held: the stream is still running
        with pytest.raises(grpc.RpcError) as refused:
            s.gen.Generate(greedy([1, 2, 3], 2, request_id="drain-late"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in refused.value.details()  # refused by the server, not a closed port
        with pytest.raises(grpc.RpcError) as upload:  # uploads too: nothing new starts while draining
            manifest = pb.AdapterManifest(adapter_id="late", config_json="{}", weights_size=1)
            s.adapters.UploadAdapter(iter([pb.UploadAdapterRequest(manifest=manifest)]), timeout=30)
        assert upload.value.code() == grpc.StatusCode.UNAVAILABLE
        assert scrape(s.server.metrics_port).get("loramux_requests_rejected_total", reason="unavailable") == 1
        hold.release()
        messages.extend(stream)
        drained.result(120)
    assert sum(len(m.token_ids) for m in messages) == 300
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH and messages[-1].generated_tokens == 300
    by_id = {ln["request_id"]: ln for ln in request_lines(log_stream)}
    assert by_id["drain-stream"]["generated_tokens"] == 300 and by_id["drain-stream"]["finish_reason"] == "length"
    assert by_id["drain-late"]["status"] == "rejected" and by_id["drain-late"]["code"] == "UNAVAILABLE"


def test_sigterm_drains_and_exits_0(serve_process: Callable[..., ServeProcess]) -> None:
    """The signal's wiring in a real process: SIGTERM with a stream sent drains (the stream gets
    all its tokens) and exits 0, with JSON request logs. Whether the stream is still running when
    the signal lands is the machine's business; what the drain does meanwhile is the test above."""
    p = serve_process("--drain-timeout", "120")
    seen = [try_health(p.channel)]
    wait_for(lambda: seen.append(try_health(p.channel)) or seen[-1] == SERVING, timeout=180, what="SERVING")
    assert NOT_SERVING not in seen[seen.index(SERVING) :]  # whatever startup showed, it ends SERVING
    unary = p.gen.Generate(
        pb.GenerateRequest(
            prompt="a secret prompt", request_id="ops-unary", params=pb.SamplingParams(max_new_tokens=3)
        ),
        timeout=60,
    )

    stream = p.gen.GenerateStream(greedy([7, 8, 9], 300, request_id="ops-stream"), timeout=300)
    messages = [next(stream)]  # the request was admitted
    p.proc.send_signal(signal.SIGTERM)
    messages.extend(stream)
    assert sum(len(m.token_ids) for m in messages) == 300
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH and messages[-1].generated_tokens == 300
    assert p.proc.wait(timeout=120) == 0

    lines = p.json_lines()  # every line of the log is JSON
    by_id = {ln["request_id"]: ln for ln in lines if ln["logger"] == "loramux.request"}
    assert set(by_id) == {"ops-unary", "ops-stream"}  # the warm-up is not logged
    line = by_id["ops-unary"]
    for key in (
        "request_id",
        "adapter_id",
        "prompt_tokens",
        "generated_tokens",
        "queue_s",
        "ttft_s",
        "total_s",
        "status",
    ):
        assert key in line, key
    assert line["status"] == "ok" and line["adapter_id"] == "" and line["level"] == "INFO"
    assert line["prompt_tokens"] == unary.prompt_tokens and line["generated_tokens"] == 3
    assert 0 <= line["queue_s"] <= line["ttft_s"] <= line["total_s"]
    assert by_id["ops-stream"]["generated_tokens"] == 300 and by_id["ops-stream"]["finish_reason"] == "length"
    assert "secret" not in p.err.read_text()  # prompt text is not logged without --log-prompts
    assert any(ln.get("msg", "").startswith("drained and stopped") for ln in lines)


def test_sigint_on_an_idle_server_exits_0(serve_process: Callable[..., ServeProcess]) -> None:
    p = serve_process()
    wait_for(lambda: try_health(p.channel) == SERVING, timeout=180, what="SERVING")
    http = re.search(r"^http listening on \S+:(\d+)$", p.out.read_text(), re.M)
    assert http, "the OpenAI-compatible API prints where it listens"
    with urllib.request.urlopen(f"http://127.0.0.1:{http.group(1)}/health", timeout=10) as resp:
        assert resp.status == 200  # and the signal below still reaches loramux's drain, not uvicorn's
    p.proc.send_signal(signal.SIGINT)
    assert p.proc.wait(timeout=60) == 0
    assert "Traceback" not in p.err.read_text()


def test_stop_ends_the_tokenizer_threads(tiny_llama_dir: Path) -> None:
    """Both front-ends tokenize on a worker thread of their own; stopping the server ends them."""
    before = set(threading.enumerate())
    with ServerThread(tiny_llama_dir, http_port=0) as s:
        s.gen.Generate(pb.GenerateRequest(prompt="tokenize me", params=pb.SamplingParams(max_new_tokens=2)), timeout=60)
        body = json.dumps({"model": s.engine.base.name, "prompt": "and me", "max_tokens": 2}).encode()
        post = urllib.request.Request(f"http://127.0.0.1:{s.server.http_port}/v1/completions", data=body,
                                      headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(post, timeout=60) as resp:
            assert resp.status == 200
        workers = [t for t in threading.enumerate() if t not in before and t.name.startswith("loramux-tokenize")]
        assert len(workers) == 2  # one per front-end
    wait_until(lambda: not any(t.is_alive() for t in workers), "the tokenizer threads ended")
