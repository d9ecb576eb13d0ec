"""`loramux cluster` on a real Ray cluster: 2 replicas (1 torch thread each) behind one front.

One cluster for the module (Ray and two model loads cost about a minute here); the
tests run in order on it: a cold burst, warm affinity and saturation, the
OpenAI-compatible HTTP API (the official `openai` client) through the same
router, uploads and overwrites through the cluster, clients that go away, and
last a replica killed under load. The oracle is a single loramux server over a
copy of the same store.
"""

from __future__ import annotations

import os
import re
import signal
from collections import defaultdict

import grpc
import httpx
import openai
import pytest

pytest.importorskip("ray.serve")

from cluster_helpers import ClusterProcess, burst, copy_store, replica_of, request, sample, scrape, store_loads
from harness import ServerThread, wait_until
from peft import LoraConfig
from peft_helpers import make_peft_adapter
from registry_helpers import AUTH, TOKEN, Adapter, upload
from test_chat import MESSAGES

from loramux.model import tiny_llama_config
from loramux.v1 import loramux_pb2 as pb

ADAPTERS = [f"lora-{i}" for i in range(6)]
PROMPTS = [[(7 * i + j) % 200 + 3 for j in range(6 + i % 4)] for i in range(64)]
BURSTS = 50  # bursts a routing state may take to show (a bound that turns a hang into a failure)
MAX_ONGOING = 40  # a cold burst of 40 never saturates a replica, even one that owns all 6 adapters
N = 8  # new tokens per request
LONG = 200  # new tokens of requests that must overlap to saturate a replica
Code = grpc.StatusCode
API_KEY = "sk-cluster-test"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-store")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    for i, name in enumerate(ADAPTERS):
        make_peft_adapter(tiny_llama_config(), cfg, root / name, seed=300 + i)
    return root


@pytest.fixture(scope="module")
def single(store, chat_llama_dir, tmp_path_factory):
    """One loramux server over a copy of the store: the outputs the cluster must give."""
    with ServerThread(chat_llama_dir, store=copy_store(store, tmp_path_factory.mktemp("single") / "s")) as s:
        yield s


@pytest.fixture(scope="module")
def cluster(store, chat_llama_dir, tmp_path_factory):
    secrets = tmp_path_factory.mktemp("secrets")
    (secrets / "token").write_text(TOKEN + "\n")
    (secrets / "key").write_text(API_KEY + "\n")
    c = ClusterProcess(
        ["--model", str(chat_llama_dir), "--store", str(store), "--device", "cpu", "--replicas", "2", "--threads", "1",
         "--no-compile", "--port", "0", "--metrics-port", "0", "--http-port", "0",
         "--max-ongoing-requests", str(MAX_ONGOING),
         "--admin-token-file", str(secrets / "token"), "--api-key-file", str(secrets / "key")]
    )  # fmt: skip
    yield c
    c.stop()


@pytest.fixture(scope="module")
def oai(cluster):
    with openai.OpenAI(base_url=f"http://{cluster.http}/v1", api_key=API_KEY, max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def owners(cluster):
    """adapter -> the rank of the replica its requests went to in the cold burst."""
    return {}


def expected(single: ServerThread, reqs: list[pb.GenerateRequest]) -> list[list[int]]:
    futures = [single.gen.Generate.future(r, timeout=600) for r in reqs]
    return [list(f.result().token_ids) for f in futures]


def total_loads(cluster: ClusterProcess) -> dict[int, float]:
    return {rank: store_loads(address) for rank, address in cluster.replica_metrics.items()}


def test_lines_and_metrics(cluster):
    assert sorted(cluster.replica_metrics) == [0, 1]
    for address in cluster.replica_metrics.values():
        assert "loramux_requests_total" in scrape(address)  # each replica's own /metrics
    assert "loramux_cluster_spilled_total" in scrape(cluster.metrics)


def test_cold_burst_loads_each_adapter_once(cluster, single, owners):
    reqs = [request(ADAPTERS[i % 6], PROMPTS[i], N) for i in range(40)]
    want = expected(single, reqs)
    got = burst(cluster.gen, reqs)
    assert [ids for ids, _ in got] == want
    served = defaultdict(set)
    for r, (_, rank) in zip(reqs, got):
        served[r.adapter_id].add(rank)
    assert all(len(ranks) == 1 for ranks in served.values()), served  # below saturation: no spill
    owners.update({a: next(iter(ranks)) for a, ranks in served.items()})
    assert sum(total_loads(cluster).values()) <= 6
    metrics = scrape(cluster.metrics)
    assert sample(metrics, "loramux_cluster_spilled_total") == 0
    for rank in set(owners.values()):
        assert sample(metrics, "loramux_cluster_routed_total", replica=str(rank)) >= 1


def test_warm_traffic_keeps_affinity_and_saturation_spills(cluster, single, owners):
    loads_before = total_loads(cluster)
    for a in ADAPTERS:  # warm, one at a time: the same replica as in the burst, nothing loaded
        for p in PROMPTS[:3]:
            _, call = cluster.gen.Generate.with_call(request(a, p, N), timeout=120)
            assert replica_of(call) == owners[a]
    assert total_loads(cluster) == loads_before

    # More long requests for one adapter than its replica may hold: the rest spill to the other.
    hot = ADAPTERS[0]
    reqs = [request(hot, PROMPTS[i], LONG) for i in range(MAX_ONGOING + 16)]
    spilled_before = sample(scrape(cluster.metrics), "loramux_cluster_spilled_total")
    got = burst(cluster.gen, reqs)
    assert [ids for ids, _ in got] == expected(single, reqs)
    assert {rank for _, rank in got} == {0, 1}
    assert sample(scrape(cluster.metrics), "loramux_cluster_spilled_total") > spilled_before
    loads = total_loads(cluster)
    other = 1 - owners[hot]
    assert loads[owners[hot]] == loads_before[owners[hot]]  # already resident on its own replica
    assert loads[other] <= loads_before[other] + 1  # loaded once where it spilled, however many spilled


def test_http_api_through_the_same_router(cluster, single, owners, oai):
    models = {m.id: m for m in oai.models.list().data}
    served = next(m.id for m in models.values() if m.parent is None)
    assert set(models) == {served, *ADAPTERS}
    assert all(models[a].parent == served for a in ADAPTERS)

    loads_before = total_loads(cluster)
    for i, a in enumerate(ADAPTERS):  # each adapter's calls go to its replica of the gRPC burst: nothing loads
        want = single.gen.Generate(request(a, PROMPTS[i], N), timeout=120)
        raw = oai.completions.with_raw_response.create(model=a, prompt=PROMPTS[i], max_tokens=N, **GREEDY)
        assert int(raw.headers["loramux-replica"]) == owners[a]
        got = raw.parse()
        assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(PROMPTS[i]), N)
    assert total_loads(cluster) == loads_before

    want = single.gen.Generate(request("", PROMPTS[9], N), timeout=120)  # the base model, by its served name
    assert oai.completions.create(model=served, prompt=PROMPTS[9], max_tokens=N, **GREEDY).choices[0].text == want.text

    # A chat stream comes through as server-sent events, one per token as it is made, with its usage chunk.
    chat = pb.GenerateRequest(
        adapter_id=ADAPTERS[2], messages=[pb.ChatMessage(**m) for m in MESSAGES],
        params=pb.SamplingParams(max_new_tokens=24, ignore_eos=True),
    )  # fmt: skip
    want = single.gen.Generate(chat, timeout=120)
    chunks = list(
        oai.chat.completions.create(
            model=ADAPTERS[2], messages=MESSAGES, max_tokens=24, stream=True, stream_options={"include_usage": True},
            **GREEDY,
        )
    )  # fmt: skip
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == want.text
    assert len([d for d in deltas if d]) > 1  # streamed, not one answer at the end
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == want.prompt_tokens

    # The replica's own errors and statuses, unchanged.
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=ADAPTERS[0], prompt="x", max_tokens=2, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with openai.OpenAI(base_url=f"http://{cluster.http}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert httpx.get(f"http://{cluster.http}/health", timeout=60).status_code == 200


def _until_both_replicas_serve(cluster, adapter: str, want: list[int]) -> None:
    """Bursts of overlapping requests until both replicas served `adapter`; every answer is `want`."""
    seen: set[int] = set()
    for _ in range(BURSTS):
        got = burst(cluster.gen, [request(adapter, PROMPTS[0], LONG)] * (MAX_ONGOING + 8))
        assert all(ids == want for ids, _ in got)
        seen |= {rank for _, rank in got}
        if seen == {0, 1}:
            return
    raise AssertionError(f"{BURSTS} saturating bursts of {adapter} never reached both replicas: {seen}")


def test_upload_and_overwrite_are_seen_by_every_replica(cluster, single, store, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    first = Adapter(tmp_path / "v1", make_peft_adapter(tiny_llama_config(), cfg, tmp_path / "v1", seed=401))
    second = Adapter(tmp_path / "v2", make_peft_adapter(tiny_llama_config(), cfg, tmp_path / "v2", seed=402))
    assert first.greedy(4, PROMPTS[0]) != second.greedy(4, PROMPTS[0])

    for version, overwrite in ((first, False), (second, True)):
        upload(cluster.adapters, "fresh", version.config, version.weights, overwrite=overwrite)
        upload(single.adapters, "fresh", version.config, version.weights, overwrite=overwrite, metadata=None)
        want = list(single.gen.Generate(request("fresh", PROMPTS[0], LONG), timeout=120).token_ids)
        got = cluster.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id="fresh"), timeout=60)
        assert got.sha256 == version.sha256
        _until_both_replicas_serve(cluster, "fresh", want)

    with pytest.raises(grpc.RpcError) as e:
        cluster.adapters.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="fresh"), timeout=60)  # no token
    assert e.value.code() == Code.UNAUTHENTICATED
    cluster.adapters.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="fresh"), metadata=AUTH, timeout=60)
    listing = cluster.adapters.ListAdapters(pb.ListAdaptersRequest(page_size=100), timeout=60)
    assert sorted(a.adapter_id for a in listing.adapters) == ADAPTERS
    for _ in range(4):
        with pytest.raises(grpc.RpcError) as e:
            cluster.gen.Generate(request("fresh", PROMPTS[0], N), timeout=60)
        assert e.value.code() == Code.NOT_FOUND


def test_a_client_that_goes_away_frees_its_request_on_the_replica(cluster, owners):
    adapter = ADAPTERS[1]
    metrics = cluster.replica_metrics[owners[adapter]]

    def ended() -> tuple[float, float]:
        text = scrape(metrics)
        return tuple(sample(text, "loramux_requests_total", status=s) for s in ("cancelled", "ok"))

    cancelled, ok = ended()
    stream = cluster.gen.GenerateStream(request(adapter, PROMPTS[3], 500), timeout=300)
    next(stream)
    stream.cancel()
    # the replica's engine ends it: a state, not a time (the bound only turns a hang into a failure)
    wait_until(lambda: ended() != (cancelled, ok), "the cancelled stream ended on its replica", 120, 0.1)
    assert ended() == (cancelled + 1, ok)
    assert sample(scrape(metrics), "loramux_requests_running") == 0

    # The same over HTTP: a stream closed after its first event is cancelled on the replica.
    cancelled, ok = ended()
    body = {"model": adapter, "prompt": PROMPTS[4], "max_tokens": 500, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"http://{cluster.http}/v1/completions", json=body, headers=headers, timeout=300) as r:
        assert r.status_code == 200 and r.headers["loramux-replica"] == str(owners[adapter])
        assert next(r.iter_lines()).startswith("data: ")
    wait_until(lambda: ended() != (cancelled, ok), "the closed HTTP stream ended on its replica", 120, 0.1)
    assert ended() == (cancelled + 1, ok)
    assert sample(scrape(metrics), "loramux_requests_running") == 0


def _replicas(cluster: ClusterProcess) -> dict[int, int]:
    """rank -> pid of every live replica, from the cluster's `loramux_cluster_replica` series."""
    found = re.findall(r"loramux_cluster_replica\{([^}]*)\} 1\.0", scrape(cluster.metrics))
    labels = [dict(re.findall(r'(\w+)="([^"]*)"', f)) for f in found]
    return {int(m["replica"]): int(m["pid"]) for m in labels}


def test_a_killed_replica_fails_its_requests_only_and_comes_back(cluster, single, owners):
    victim = owners[ADAPTERS[0]]
    survivor = 1 - victim
    theirs = [a for a in ADAPTERS if owners[a] == survivor]
    pid = _replicas(cluster)[victim]

    doomed = cluster.gen.GenerateStream(request(ADAPTERS[0], PROMPTS[1], 500), timeout=300)
    next(doomed)  # in flight on the victim
    kept_req = request(theirs[0] if theirs else "", PROMPTS[2], LONG)
    kept = cluster.gen.GenerateStream(kept_req, timeout=300)
    first = next(kept)
    os.kill(pid, signal.SIGKILL)

    with pytest.raises(grpc.RpcError) as e:
        for _ in doomed:
            pass
    assert e.value.code() == Code.UNAVAILABLE
    tokens = list(first.token_ids) + [t for m in kept for t in m.token_ids]
    if replica_of(kept) == survivor:  # the other replica's request is untouched by the failure
        assert tokens == expected(single, [kept_req])[0]

    # Requests sent after the failure are served (by the live replica, then the restarted one too).
    reqs = [request(ADAPTERS[i % 6], PROMPTS[i], N) for i in range(12)]
    assert [ids for ids, _ in burst(cluster.gen, reqs)] == expected(single, reqs)

    def restarted() -> bool:  # Ray restarts the replica: wait for the router to see it (a state, not a time)
        now = _replicas(cluster)
        return len(now) == 2 and pid not in now.values()

    wait_until(restarted, "the killed replica restarted and registered", 300, 0.2)
    now = _replicas(cluster)
    ranks: set[int] = set()
    for _ in range(BURSTS):  # the restarted replica serves too (its adapters come back to it)
        got = burst(cluster.gen, reqs)
        assert [ids for ids, _ in got] == expected(single, reqs)
        ranks |= {rank for _, rank in got}
        if ranks == set(now):
            break
    assert ranks == set(now), f"the restarted replica served none of {BURSTS} bursts"
