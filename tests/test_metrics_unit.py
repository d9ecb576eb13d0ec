"""Metrics and request logs, through the real /metrics HTTP endpoint.

Names, types and labels are those of the DESIGN.md Metrics table; the scrape is
parsed with prometheus_client's own parser, and raw `# TYPE` lines are checked
too, because the parser strips `_total` from counter family names.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loramux import logs
from loramux.adapter_labels import AdapterLabels
from loramux.logs import log_request, setup_logging
from loramux.metrics import Metrics

# Exposed name -> (type, label names). The DESIGN.md table, then our extras.
EXPECTED: dict[str, tuple[str, frozenset[str]]] = {
    "loramux_time_to_first_token_seconds": ("histogram", frozenset()),
    "loramux_inter_token_latency_seconds": ("histogram", frozenset()),
    "loramux_request_latency_seconds": ("histogram", frozenset()),
    "loramux_request_queue_seconds": ("histogram", frozenset()),
    "loramux_adapter_load_seconds": ("histogram", frozenset({"tier"})),
    "loramux_batch_forward_seconds": ("histogram", frozenset({"phase"})),
    "loramux_requests_total": ("counter", frozenset({"status"})),
    "loramux_prompt_tokens_total": ("counter", frozenset()),
    "loramux_generated_tokens_total": ("counter", frozenset()),
    "loramux_adapter_cache_hits_total": ("counter", frozenset({"tier"})),
    "loramux_adapter_cache_misses_total": ("counter", frozenset({"tier"})),
    "loramux_adapter_cache_evictions_total": ("counter", frozenset({"tier"})),
    "loramux_merged_batches_total": ("counter", frozenset()),
    "loramux_requests_running": ("gauge", frozenset()),
    "loramux_requests_waiting": ("gauge", frozenset()),
    "loramux_adapters_resident": ("gauge", frozenset({"tier"})),
    "loramux_adapter_bytes_resident": ("gauge", frozenset({"tier"})),
    "loramux_device_slots_free": ("gauge", frozenset()),
    "loramux_kv_blocks_used": ("gauge", frozenset()),
    "loramux_kv_blocks_cached": ("gauge", frozenset()),
    "loramux_kv_blocks_total": ("gauge", frozenset()),
    "loramux_prefix_cache_queries_total": ("counter", frozenset()),
    "loramux_prefix_cache_hits_total": ("counter", frozenset()),
    "loramux_preemptions_total": ("counter", frozenset()),
    # extras
    "loramux_batch_size": ("histogram", frozenset({"phase"})),
    "loramux_adapter_requests_total": ("counter", frozenset({"adapter"})),
    "loramux_adapter_generated_tokens_total": ("counter", frozenset({"adapter"})),
    "loramux_merge_decisions_total": ("counter", frozenset({"action"})),
    "loramux_frontend_requests_total": ("counter", frozenset({"frontend", "status"})),
    "loramux_info": ("gauge", frozenset({"version", "python"})),
}


class Scrape:
    """One scrape: raw text plus sample values keyed by (sample name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}
        self.families = list(text_string_to_metric_families(text))
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for fam in self.families:
            for s in fam.samples:
                self.values[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(k)[label] for (n, k) in self.values if n == name and label in dict(k)}


@pytest.fixture
def served() -> Iterator[tuple[Metrics, int]]:
    m = Metrics(max_adapter_labels=2)
    server, port = m.start_http_server("127.0.0.1", 0)
    assert port > 0 and server.server_address[1] == port
    yield m, port
    m.stop_http_server()


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return Scrape(resp.read().decode())


def test_every_family_has_its_name_type_and_labels(served: tuple[Metrics, int]) -> None:
    m, port = served
    # Touch the label-less-until-used series so every family has samples.
    m.request_finished("ok", 1, 1, 0.0, 0.0, 0.0, "a")
    s = scrape(port)
    for name, (kind, _) in EXPECTED.items():
        assert s.types.get(name) == kind, f"{name}: exposed as {s.types.get(name)!r}, want {kind}"
    by_name = {f.name: f for f in s.families}
    for name, (kind, labels) in EXPECTED.items():
        fam_name = name.removesuffix("_total") if kind == "counter" else name
        fam = by_name[fam_name]
        assert fam.type == kind
        seen = {k for smp in fam.samples for k in smp.labels if k != "le"}
        assert seen == labels, f"{name}: labels {seen}, want {labels}"
    # Known label values exist at 0 before first use, so rate() works at once.
    assert s.label_values("loramux_batch_forward_seconds_count", "phase") == {"prefill", "decode"}
    assert {"host", "device", "merged"} <= s.label_values("loramux_adapter_cache_hits_total", "tier")
    assert {"ok", "cancelled", "error"} <= s.label_values("loramux_requests_total", "status")
    # Buckets span 1 ms .. 60 s.
    les = s.label_values("loramux_request_latency_seconds_bucket", "le")
    assert {"0.001", "60.0", "+Inf"} <= les


def test_exact_deltas(served: tuple[Metrics, int]) -> None:
    m, port = served
    before = scrape(port)
    m.request_finished("ok", 7, 5, 0.002, 0.05, 0.3, "a")
    m.request_finished("cancelled", 3, 0, 0.001, None, 0.01, None)
    m.request_finished("rejected", 0, 0, None, None, None, "a")
    for _ in range(4):
        m.token_latency(0.02)
    m.forward("prefill", 0.1, batch_size=3)
    m.forward("decode", 0.01)
    m.forward("decode", 0.01)
    m.cache_hit("device")
    m.cache_miss("device")
    m.cache_miss("host")
    m.eviction("device")
    m.adapter_load("host", 0.5)
    m.merged_batch()
    m.merge_decision("merge")
    m.set_running(3)
    m.set_waiting(9)
    m.set_resident("device", 2, 4096)
    m.set_slots_free(6)
    m.set_info(model="demo", device="cpu")
    after = scrape(port)

    def d(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    assert d("loramux_requests_total", status="ok") == 1
    assert d("loramux_requests_total", status="cancelled") == 1
    assert d("loramux_requests_total", status="rejected") == 1
    assert d("loramux_prompt_tokens_total") == 10
    assert d("loramux_generated_tokens_total") == 5
    # None times are not observed.
    assert d("loramux_request_queue_seconds_count") == 2
    assert d("loramux_time_to_first_token_seconds_count") == 1
    assert d("loramux_time_to_first_token_seconds_sum") == pytest.approx(0.05)
    assert d("loramux_request_latency_seconds_count") == 2
    assert d("loramux_inter_token_latency_seconds_count") == 4
    assert d("loramux_batch_forward_seconds_count", phase="prefill") == 1
    assert d("loramux_batch_forward_seconds_count", phase="decode") == 2
    assert d("loramux_batch_size_sum", phase="prefill") == 3
    assert d("loramux_batch_size_count", phase="decode") == 0
    assert d("loramux_adapter_cache_hits_total", tier="device") == 1
    assert d("loramux_adapter_cache_misses_total", tier="device") == 1
    assert d("loramux_adapter_cache_misses_total", tier="host") == 1
    assert d("loramux_adapter_cache_evictions_total", tier="device") == 1
    assert d("loramux_adapter_load_seconds_count", tier="host") == 1
    assert d("loramux_adapter_load_seconds_bucket", tier="host", le="0.5") == 1
    assert d("loramux_adapter_load_seconds_bucket", tier="host", le="0.25") == 0
    assert d("loramux_merged_batches_total") == 1
    assert d("loramux_merge_decisions_total", action="merge") == 1
    assert d("loramux_adapter_requests_total", adapter="a") == 2
    assert d("loramux_adapter_requests_total", adapter="base") == 1
    assert d("loramux_adapter_generated_tokens_total", adapter="a") == 5
    assert after.get("loramux_requests_running") == 3
    assert after.get("loramux_requests_waiting") == 9
    assert after.get("loramux_adapters_resident", tier="device") == 2
    assert after.get("loramux_adapter_bytes_resident", tier="device") == 4096
    assert after.get("loramux_device_slots_free") == 6
    info = [k for (n, k) in after.values if n == "loramux_info"]
    assert len(info) == 1 and {("model", "demo"), ("device", "cpu")} <= info[0]


def test_adapter_labels_are_bounded(served: tuple[Metrics, int]) -> None:
    m, port = served  # max_adapter_labels=2
    # c, d and e are each no busier than b, so they do not take its label.
    for adapter in ["a", "b", "c", "d", "a", "e", "", None, "other", "base"]:
        m.request_finished("ok", 1, 2, 0.0, 0.0, 0.0, adapter)
    s = scrape(port)
    assert s.label_values("loramux_adapter_requests_total", "adapter") == {"a", "b", "base", "other"}
    assert s.get("loramux_adapter_requests_total", adapter="a") == 2
    assert s.get("loramux_adapter_requests_total", adapter="b") == 1
    # c, d, e, and the ids literally named "other" and "base".
    assert s.get("loramux_adapter_requests_total", adapter="other") == 5
    assert s.get("loramux_adapter_requests_total", adapter="base") == 2
    assert s.get("loramux_adapter_generated_tokens_total", adapter="other") == 10


def test_many_adapters_keep_few_series() -> None:
    m = Metrics(max_adapter_labels=4)
    for i in range(5000):
        m.request_finished("ok", 1, 1, 0.0, 0.0, 0.0, f"adapter-{i}")
    s = Scrape(m.render().decode())
    assert len(s.label_values("loramux_adapter_requests_total", "adapter")) <= 4 + 1
    assert s.get("loramux_requests_total", status="ok") == 5000
    # The activity table is bounded too, not one entry per id ever seen.
    assert len(m.adapter_labels._scores) <= m.adapter_labels._capacity


def test_most_active_adapter_takes_the_label_of_an_idle_one(served: tuple[Metrics, int]) -> None:
    m, port = served
    now = [0.0]
    m.adapter_labels = AdapterLabels(2, half_life_s=10.0, clock=lambda: now[0])
    for adapter in ["a", "b", "b", "c"]:
        m.request_finished("ok", 1, 1, 0.0, 0.0, 0.0, adapter)
    assert m.adapter_labels.labelled() == {"a", "b"}  # c was not busier than a
    now[0] = 100.0  # ten half-lives: a and b are now idle
    m.request_finished("ok", 1, 1, 0.0, 0.0, 0.0, "c")
    s = scrape(port)
    assert m.adapter_labels.labelled() == {"b", "c"}  # a (the weakest) lost its label
    # a's series is gone rather than moved, so no exposed counter ever decreases.
    assert s.label_values("loramux_adapter_requests_total", "adapter") == {"b", "c", "other"}
    assert s.get("loramux_adapter_requests_total", adapter="c") == 1
    assert s.get("loramux_adapter_requests_total", adapter="other") == 1


def test_concurrent_updates_are_counted_exactly() -> None:
    m = Metrics(max_adapter_labels=3)
    n_threads, per_thread = 8, 500

    def work(t: int) -> None:
        for i in range(per_thread):
            m.request_finished("ok", 2, 1, 0.001, 0.001, 0.002, f"ad{(t * 7 + i) % 11}")
            m.token_latency(0.001)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = Scrape(m.render().decode())
    total = n_threads * per_thread
    assert s.get("loramux_requests_total", status="ok") == total
    assert s.get("loramux_prompt_tokens_total") == 2 * total
    assert s.get("loramux_inter_token_latency_seconds_count") == total
    assert len(s.label_values("loramux_adapter_requests_total", "adapter")) <= 3 + 1


def test_registries_are_separate_and_server_stops() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    a.merged_batch()
    assert "loramux_merged_batches_total 1.0" in a.render().decode()
    assert "loramux_merged_batches_total 0.0" in b.render().decode()
    _, port = b.start_http_server("127.0.0.1", 0)
    with pytest.raises(RuntimeError):
        b.start_http_server("127.0.0.1", 0)
    b.stop_http_server()
    b.stop_http_server()  # idempotent
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_bad_label_bounds_rejected() -> None:
    with pytest.raises(ValueError):
        Metrics(max_adapter_labels=-1)
    with pytest.raises(ValueError):
        Metrics(adapter_label_half_life_s=0)


# ---- request logs -------------------------------------------------------------

RECORD = {
    "request_id": "r-1",
    "adapter_id": "a",
    "prompt_tokens": 3,
    "generated_tokens": 2,
    "queue_s": 0.0012345678,
    "ttft_s": None,
    "total_s": 1.5,
    "status": "ok",
    "finish_reason": "eos",
    "prompt": "secret prompt",
    "text": "secret output",
}


@pytest.fixture
def log_stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    # Restores the module's prompt switch and the root logger after the test.
    monkeypatch.setattr(logs, "_log_prompts", False)
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    stream = io.StringIO()
    yield stream
    for h in list(root.handlers):
        if h not in saved[1]:
            root.removeHandler(h)
    root.setLevel(saved[0])


def test_json_request_line(log_stream: io.StringIO) -> None:
    setup_logging("json", "info", stream=log_stream)
    log_request(RECORD)
    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["logger"] == "loramux.request" and line["level"] == "INFO"
    for key in (
        "request_id",
        "adapter_id",
        "prompt_tokens",
        "generated_tokens",
        "queue_s",
        "ttft_s",
        "total_s",
        "status",
        "finish_reason",
    ):
        assert key in line
    assert line["queue_s"] == 0.001235 and line["ttft_s"] is None and line["generated_tokens"] == 2
    assert "prompt" not in line and "text" not in line
    assert "secret" not in lines[0]


def test_prompts_only_when_configured(log_stream: io.StringIO) -> None:
    setup_logging("json", "INFO", log_prompts=True, stream=log_stream)
    log_request(RECORD)
    line = json.loads(log_stream.getvalue())
    assert line["prompt"] == "secret prompt" and line["text"] == "secret output"


def test_text_request_is_one_line(log_stream: io.StringIO) -> None:
    setup_logging("text", logging.DEBUG, stream=log_stream)
    setup_logging("text", logging.DEBUG, stream=log_stream)  # replaces, does not duplicate
    log_request({**RECORD, "status": "error", "error": 'bad "thing"\nsecond line'})
    out = log_stream.getvalue()
    assert out.count("\n") == 1
    assert "request_id=r-1" in out and "status=error" in out and "ttft_s=null" in out
    assert 'error="bad \\"thing\\"\\nsecond line"' in out
    assert "secret" not in out


def test_setup_logging_validates() -> None:
    with pytest.raises(ValueError):
        setup_logging("xml", "INFO")
    with pytest.raises(ValueError):
        setup_logging("json", "LOUD")
