"""The cluster's parts that need no Ray cluster: one store shared by two processes' views,
rendezvous hashing, the HTTP front's routing key, the settings a Serve config passes,
and the application it builds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from test_store import lora_validator, upload, weights

from loramux.adapters.store.store import AdapterStore
from loramux.cluster.config import ClusterConfig, configs_from_mapping
from loramux.cluster.http_front import route_key
from loramux.cluster.rendezvous import rendezvous_order


def test_one_store_two_views(tmp_path: Path) -> None:
    """What replica A publishes, overwrites or deletes, replica B sees at its next refresh."""
    a, b = AdapterStore(tmp_path), AdapterStore(tmp_path)
    a.scan(), b.scan()
    assert b.refresh("x") is None
    first = upload(a, "x", weights(1))
    assert not b.exists("x")  # B's records change only through B, or a refresh
    assert b.refresh("x").sha256 == first.sha256 and b.exists("x")
    assert b.refresh("x") is b.get("x")  # unchanged on disk: the same record, nothing re-read

    second = upload(a, "x", weights(2), overwrite=True, validate=lora_validator())
    assert b.get("x").sha256 == first.sha256
    assert b.refresh("x").sha256 == second.sha256 != first.sha256

    upload(b, "y", weights(3))
    assert [r.adapter_id for r in a.refresh_all()] == ["x", "y"]
    b.delete("x")
    assert a.exists("x") and a.refresh("x") is None and not a.exists("x")
    assert [r.adapter_id for r in a.refresh_all()] == ["y"]
    with pytest.raises(ValueError):
        a.refresh("../etc")  # ids never touch paths unchecked


def test_rendezvous_is_stable_and_moves_only_what_it_must() -> None:
    nodes = [f"replica-{i}" for i in range(4)]
    keys = [f"adapter-{i}" for i in range(2000)]
    first = {k: rendezvous_order(k, nodes)[0] for k in keys}
    assert first == {k: rendezvous_order(k, list(reversed(nodes)))[0] for k in keys}  # order-independent
    spread = Counter(first.values())
    assert min(spread.values()) > 2000 / 4 * 0.8  # about even
    # A replica leaves: only its keys move, each to its own second choice.
    gone = nodes[1]
    after = {k: rendezvous_order(k, [n for n in nodes if n != gone])[0] for k in keys}
    assert all(after[k] == first[k] for k in keys if first[k] != gone)
    assert all(after[k] == rendezvous_order(k, nodes)[1] for k in keys if first[k] == gone)


def test_settings_from_a_serve_config() -> None:
    server, cluster = configs_from_mapping(
        {"model": "demo", "store": "/s", "port": "0", "max-running": "8", "replicas": 3, "log_prompts": "true"}
    )
    assert (server.port, server.engine.max_running, server.store, server.log_prompts) == (0, 8, Path("/s"), True)
    assert (cluster.replicas, cluster.max_ongoing_requests) == (3, ClusterConfig().max_ongoing_requests)
    with pytest.raises(ValueError, match="unknown settings: replica"):
        configs_from_mapping({"replica": 2})
    with pytest.raises(ValueError, match="replicas"):
        configs_from_mapping({"replicas": 0})
    with pytest.raises(ValueError, match="max_running"):
        configs_from_mapping({"max_running": -1})


def test_the_http_front_routes_on_the_adapter_a_call_names() -> None:
    body = b'{"model": "lora-1", "prompt": "x"}'
    assert route_key("POST", "/v1/completions", body, "base") == "lora-1"
    assert route_key("POST", "/v1/chat/completions", b'{"model": "a", "messages": []}', "base") == "a"
    assert route_key("POST", "/v1/load_lora_adapter", b'{"lora_name": "n", "lora_path": "p"}', "base") == "n"
    assert route_key("POST", "/v1/unload_lora_adapter", b'{"lora_name": "n"}', "base") == "n"
    # The base model, listings, health and bodies the replica refuses have no adapter: the least loaded.
    assert route_key("POST", "/v1/completions", b'{"model": "base", "prompt": "x"}', "base") == ""
    assert route_key("GET", "/v1/models", b"", "base") == ""
    assert route_key("GET", "/health", b"", "base") == ""
    for bad in (b"not json", b"[1, 2]", b'{"model": 3}', b""):
        assert route_key("POST", "/v1/completions", bad, "base") == ""


def test_the_application_has_a_front_and_the_replicas(tmp_path: Path) -> None:
    pytest.importorskip("ray.serve")
    from loramux.cluster.app import build_app
    from loramux.cluster.router import AdapterAffinityRouter

    app = build_app({"store": str(tmp_path), "replicas": 2, "max_ongoing_requests": 7, "threads": 1})
    front = app._bound_deployment
    replica = front.init_args[0]._bound_deployment
    assert (front.name, replica.name, replica.num_replicas) == ("LoramuxFront", "LoramuxReplica", 2)
    assert replica.max_ongoing_requests == 7
    assert replica._deployment_config.request_router_config.get_request_router_class() is AdapterAffinityRouter
    assert front.init_args[1].store == tmp_path.resolve()  # replicas run elsewhere: absolute paths
    assert replica.init_args[0].threads == 1 and replica.ray_actor_options["num_cpus"] == 1  # threads per replica
