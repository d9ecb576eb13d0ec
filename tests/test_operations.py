"""Operations, end to end: exact metrics from a real server, health transitions,
graceful drain (in process, with the engine held, so a stream is surely running while
the drain refuses new work; and on SIGTERM/SIGINT of a real `loramux serve` process),
request logs.

The unit side of metrics and logs (every method, label bounds, formatters) is in
test_metrics_unit.py; here the numbers come from real requests.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import Hold, ServeProcess, ServerThread, wait_until
from test_metrics_unit import EXPECTED, Scrape

import loramux.api.server as server_mod
from loramux import logs
from loramux.api.server import LoramuxServer
from loramux.config import ServerConfig
from loramux.logs import setup_logging
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_LABELS = 3


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return Scrape(resp.read().decode())


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def health(channel: grpc.Channel, timeout: float = 5.0) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status


def greedy(ids: list[int], n: int, **kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=ids, params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True), **kw)


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[ServerThread]:
    with ServerThread(tiny_llama_dir, max_running=8, metrics_max_adapter_labels=MAX_LABELS) as s:
        s.initial = scrape(s.server.metrics_port)  # before any client request
        yield s


# ---- metrics ----------------------------------------------------------------------


def test_warm_up_is_not_client_traffic(server: ServerThread) -> None:
    s = server.initial
    assert s.get("loramux_requests_total", status="ok") == 0
    assert s.get("loramux_generated_tokens_total") == 0
    assert s.get("loramux_time_to_first_token_seconds_count") == 0
    assert s.get("loramux_device_slots_free") == server.config.engine.max_device_adapters
    assert s.get("loramux_requests_running") == 0 and s.get("loramux_requests_waiting") == 0


def test_exact_deltas_and_types_after_known_requests(server: ServerThread) -> None:
    port = server.server.metrics_port
    before = scrape(port)
    steps_before = server.engine.steps
    cases = [([5, 6, 7], 5), ([10] * 20, 7), ([40, 41], 1)]
    futures = [server.gen.Generate.future(greedy(ids, n)) for ids, n in cases]
    for fut, (_, n) in zip(futures, cases):
        assert fut.result(timeout=120).generated_tokens == n
    stream = list(server.gen.GenerateStream(greedy([9, 8, 7, 6], 6), timeout=120))
    assert sum(len(m.token_ids) for m in stream) == 6
    n_req = len(cases) + 1
    tokens = sum(n for _, n in cases) + 6
    prompt = sum(len(ids) for ids, _ in cases) + 4
    # A response is sent after its request was counted; the gauges follow the step.
    wait_for(lambda: scrape(port).get("loramux_requests_running") == 0, what="running gauge back to 0")
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    assert delta("loramux_requests_total", status="ok") == n_req
    for status in ("cancelled", "deadline", "error", "rejected"):
        assert delta("loramux_requests_total", status=status) == 0, status
    assert delta("loramux_generated_tokens_total") == tokens
    assert delta("loramux_prompt_tokens_total") == prompt
    for hist in ("loramux_time_to_first_token_seconds", "loramux_request_latency_seconds",
                 "loramux_request_queue_seconds"):
        assert delta(f"{hist}_count") == n_req, hist
    # Every token after a request's first is one inter-token gap.
    assert delta("loramux_inter_token_latency_seconds_count") == tokens - n_req
    prefill = delta("loramux_batch_forward_seconds_count", phase="prefill")
    decode = delta("loramux_batch_forward_seconds_count", phase="decode")
    assert prefill >= 1 and decode >= 1
    assert prefill + decode == server.engine.steps - steps_before  # one observation per forward
    assert delta("loramux_adapter_requests_total", adapter="base") == n_req
    assert after.get("loramux_requests_running") == 0 and after.get("loramux_requests_waiting") == 0
    assert after.get("loramux_device_slots_free") == server.config.engine.max_device_adapters
    for name, (kind, _) in EXPECTED.items():
        assert after.types.get(name) == kind, f"{name}: exposed as {after.types.get(name)!r}, want {kind}"
    assert after.types.get("loramux_requests_rejected_total") == "counter"


def test_refused_requests_count_as_rejected(server: ServerThread) -> None:
    port = server.server.metrics_port
    before = scrape(port)
    bad = [
        (pb.GenerateRequest(prompt="x", params=pb.SamplingParams(temperature=-1.0)), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(prompt="x", prompt_token_ids=[5]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(prompt="x", adapter_id="no-such-adapter"), grpc.StatusCode.NOT_FOUND),
    ]
    for req, code in bad:
        with pytest.raises(grpc.RpcError) as e:
            server.gen.Generate(req, timeout=30)
        assert e.value.code() == code
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    assert delta("loramux_requests_total", status="rejected") == 3
    assert delta("loramux_requests_rejected_total", reason="invalid_argument") == 2
    assert delta("loramux_requests_rejected_total", reason="not_found") == 1
    assert delta("loramux_requests_total", status="ok") == 0
    assert delta("loramux_prompt_tokens_total") == 0
    assert delta("loramux_time_to_first_token_seconds_count") == 0
    assert delta("loramux_request_latency_seconds_count") == 0
    # An unknown id is not an adapter: it gets no series of its own.
    assert after.label_values("loramux_adapter_requests_total", "adapter") <= {"base", "other"}


def test_cancelled_stream_counts_as_cancelled(server: ServerThread) -> None:
    port = server.server.metrics_port
    before = scrape(port)
    stream = server.gen.GenerateStream(greedy([3, 4, 5], 400), timeout=120)
    next(stream)
    stream.cancel()
    wait_for(lambda: scrape(port).get("loramux_requests_total", status="cancelled")
             == before.get("loramux_requests_total", status="cancelled") + 1, what="the cancelled count")
    wait_for(lambda: server.engine.idle, what="the engine to free the request")
    after = scrape(port)
    assert after.get("loramux_requests_total", status="ok") == before.get("loramux_requests_total", status="ok")
    assert after.get("loramux_requests_running") == 0


def test_adapter_label_bound_comes_from_the_flag(server: ServerThread) -> None:
    labels = server.server.metrics.adapter_labels
    for i in range(MAX_LABELS + 2):  # more adapters than labels
        labels.label(f"adapter-{i}")
    assert len(labels.labelled()) == MAX_LABELS


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
    server.gen.Generate(pb.GenerateRequest(prompt="zebra secret", request_id="lp-1",
                                           params=pb.SamplingParams(max_new_tokens=2)), timeout=60)
    (line,) = [ln for ln in request_lines(log_stream) if ln["request_id"] == "lp-1"]
    assert line["status"] == "ok" and line["prompt_tokens"] == len(b"zebra secret")
    assert ("zebra secret" in log_stream.getvalue()) is log_prompts
    if log_prompts:
        assert line["prompt"] == "zebra secret"


# ---- health while loading ---------------------------------------------------------------


def test_not_serving_until_loaded_and_warmed(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    gate = threading.Event()
    real_load = server_mod.load_base_model

    def gated_load(*args: object) -> object:  # holds the model load until the test has looked
        gate.wait(60)
        return real_load(*args)

    monkeypatch.setattr(server_mod, "load_base_model", gated_load)
    srv = LoramuxServer(ServerConfig(model=str(tiny_llama_dir), store=tmp_path, port=0, metrics_port=0,
                                     device="cpu"))
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
            wait_for(lambda: _try(lambda: health(ch)) == NOT_SERVING, what="NOT_SERVING while loading")
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


def _try(fn: Callable[[], int]) -> int | None:
    try:
        return fn()
    except grpc.RpcError:
        return None


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
    seen = [_try(lambda: health(p.channel))]
    wait_for(lambda: seen.append(_try(lambda: health(p.channel))) or seen[-1] == SERVING, timeout=180,
             what="SERVING")
    assert NOT_SERVING not in seen[seen.index(SERVING):]  # whatever startup showed, it ends SERVING
    unary = p.gen.Generate(pb.GenerateRequest(prompt="a secret prompt", request_id="ops-unary",
                                              params=pb.SamplingParams(max_new_tokens=3)), timeout=60)

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
    for key in ("request_id", "adapter_id", "prompt_tokens", "generated_tokens", "queue_s", "ttft_s", "total_s",
                "status"):
        assert key in line, key
    assert line["status"] == "ok" and line["adapter_id"] == "" and line["level"] == "INFO"
    assert line["prompt_tokens"] == unary.prompt_tokens and line["generated_tokens"] == 3
    assert 0 <= line["queue_s"] <= line["ttft_s"] <= line["total_s"]
    assert by_id["ops-stream"]["generated_tokens"] == 300 and by_id["ops-stream"]["finish_reason"] == "length"
    assert "secret" not in p.err.read_text()  # prompt text is not logged without --log-prompts
    assert any(ln.get("msg", "").startswith("drained and stopped") for ln in lines)


def test_sigint_on_an_idle_server_exits_0(serve_process: Callable[..., ServeProcess]) -> None:
    p = serve_process()
    wait_for(lambda: _try(lambda: health(p.channel)) == SERVING, timeout=180, what="SERVING")
    http = re.search(r"^http listening on \S+:(\d+)$", p.out.read_text(), re.M)
    assert http, "the OpenAI-compatible API prints where it listens"
    with urllib.request.urlopen(f"http://127.0.0.1:{http.group(1)}/health", timeout=10) as resp:
        assert resp.status == 200  # and the signal below still reaches loramux's drain, not uvicorn's
    p.proc.send_signal(signal.SIGINT)
    assert p.proc.wait(timeout=60) == 0
    assert "Traceback" not in p.err.read_text()
