"""Operations, end to end: exact metrics from a real server (health, drain, signals and
request logs are in test_lifecycle.py).

The unit side of metrics and logs (every method, label bounds, formatters) is in
test_metrics_unit.py; here the numbers come from real requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import ServerThread
from ops_helpers import MAX_LABELS, greedy, scrape, wait_for
from test_metrics_unit import EXPECTED

from loramux.v1 import loramux_pb2 as pb


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
    for hist in (
        "loramux_time_to_first_token_seconds",
        "loramux_request_latency_seconds",
        "loramux_request_queue_seconds",
    ):
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
    wait_for(
        lambda: (
            scrape(port).get("loramux_requests_total", status="cancelled")
            == before.get("loramux_requests_total", status="cancelled") + 1
        ),
        what="the cancelled count",
    )
    wait_for(lambda: server.engine.idle, what="the engine to free the request")
    after = scrape(port)
    assert after.get("loramux_requests_total", status="ok") == before.get("loramux_requests_total", status="ok")
    assert after.get("loramux_requests_running") == 0


def test_adapter_label_bound_comes_from_the_flag(server: ServerThread) -> None:
    labels = server.server.metrics.adapter_labels
    for i in range(MAX_LABELS + 2):  # more adapters than labels
        labels.label(f"adapter-{i}")
    assert len(labels.labelled()) == MAX_LABELS
