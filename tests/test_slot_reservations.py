"""No request waits on a device-slot reservation whose owner is gone; every slot pinned answers at once.

A request that finds every slot held reserves one (it takes no new leases, drains, and the
waiting request claims it). These tests take the owner away every way it can go (cancelled,
past its deadline, served from another slot, its slot pinned by LoadAdapter, its adapter
deleted) and check that nothing then waits on the reservation. The engine is held with
`Hold` wherever an order matters; no test depends on timing.
"""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import grpc
import pytest
from harness import Hold, ServerThread, wait_until
from peft import LoraConfig
from peft_helpers import make_peft_adapter

from loramux.model import tiny_llama_config
from loramux.v1 import loramux_pb2 as pb

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
SLOW = 60  # the bound a request that hangs on a stale reservation runs into (a failure, not a measurement)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reservations")
    for i, name in enumerate(("a", "b", "c")):
        make_peft_adapter(tiny_llama_config(), LORA, root / name, seed=40 + i)
    return root


def store_of(adapters: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(adapters, store)
    return store


def req(adapter: str, n: int, ids: tuple[int, ...] = (5, 6, 7)) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=adapter, prompt_token_ids=list(ids), params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True)
    )


def reservations(s: ServerThread) -> list[str | None]:
    """Each slot's reservation owner, read on the engine thread."""
    return s.engine.call(lambda: [slot.reserved_for for slot in s.server.cache.slots]).result(30)


def running_on(s: ServerThread, adapter: str) -> grpc.Future:
    """A long stream on `adapter`, running (its first token arrived) and holding its slot."""
    stream = s.gen.GenerateStream(req(adapter, 400), timeout=300)
    next(stream)
    return stream


def reserve_for(s: ServerThread, adapter: str) -> grpc.Future:
    """A request for `adapter` that finds every slot held and reserves one."""
    fut = s.gen.Generate.future(req(adapter, 4), timeout=300)
    wait_until(lambda: adapter in reservations(s), f"a slot reserved for {adapter}")
    return fut


def metric(s: ServerThread, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.server.metrics_port}/metrics", timeout=30).read().decode()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.split(" ")[0] == want)


@pytest.mark.parametrize("how", ["cancelled", "deadline"])
def test_a_reservation_lapses_when_its_request_goes(adapters, tiny_llama_dir, tmp_path, how):
    with ServerThread(tiny_llama_dir, store=store_of(adapters, tmp_path), max_device_adapters=1) as s:
        holder = running_on(s, "a")
        if how == "cancelled":
            reserve_for(s, "b").cancel()
        else:
            waiter = s.gen.Generate.future(req("b", 4), timeout=3)
            wait_until(lambda: "b" in reservations(s), "a slot reserved for b")
            with Hold(s.engine):  # the holder cannot finish (and free the slot) before b's deadline
                with pytest.raises(grpc.RpcError) as e:
                    waiter.result()
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: s.engine.num_waiting == 0, "the waiting request to be dropped")
        assert reservations(s) == [None]
        # The slot serves its adapter again at once, beside the request that still runs on it.
        assert len(s.gen.Generate(req("a", 4), timeout=SLOW).token_ids) == 4
        holder.cancel()


def test_a_reservation_lapses_when_its_adapter_gets_another_slot(adapters, tiny_llama_dir, tmp_path):
    with ServerThread(tiny_llama_dir, store=store_of(adapters, tmp_path), max_device_adapters=2) as s:
        streams = {name: running_on(s, name) for name in ("a", "b")}
        waiter = reserve_for(s, "c")
        (reserved,) = [owner_slot for owner_slot, who in enumerate(reservations(s)) if who == "c"]
        reserved_adapter = s.server.cache.slots[reserved].key[0]
        other = "b" if reserved_adapter == "a" else "a"
        streams[other].cancel()  # the other slot goes idle: c loads there instead
        assert len(waiter.result(timeout=SLOW).token_ids) == 4
        assert reservations(s) == [None, None]
        # The slot that was reserved serves its adapter again (it waited forever before).
        assert len(s.gen.Generate(req(reserved_adapter, 4), timeout=SLOW).token_ids) == 4
        streams[reserved_adapter].cancel()


def test_pinning_the_reserved_slot_answers_and_the_waiter_is_refused(adapters, tiny_llama_dir, tmp_path):
    with ServerThread(tiny_llama_dir, store=store_of(adapters, tmp_path), max_device_adapters=1) as s:
        holder = running_on(s, "a")
        waiter = reserve_for(s, "b")
        got = s.adapters.LoadAdapter(pb.LoadAdapterRequest(adapter_id="a", pin=True), timeout=SLOW)
        assert got.pinned and got.state == pb.ADAPTER_STATE_DEVICE
        with pytest.raises(grpc.RpcError) as e:  # the only slot is pinned now: b can never load
            waiter.result(timeout=SLOW)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in e.value.details()
        holder.cancel()


def test_every_slot_pinned_is_resource_exhausted_at_once(adapters, tiny_llama_dir, tmp_path):
    with ServerThread(tiny_llama_dir, store=store_of(adapters, tmp_path), max_device_adapters=2) as s:
        for name in ("a", "b"):
            s.adapters.LoadAdapter(pb.LoadAdapterRequest(adapter_id=name, pin=True), timeout=SLOW)
        before = metric(s, "loramux_requests_rejected_total", reason="resource_exhausted")
        for call in (s.gen.Generate, lambda r, timeout: list(s.gen.GenerateStream(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as e:
                call(req("c", 4), timeout=SLOW)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "pinned" in e.value.details() and "'c'" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            s.adapters.LoadAdapter(pb.LoadAdapterRequest(adapter_id="c", pin=True), timeout=SLOW)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in e.value.details()
        assert metric(s, "loramux_requests_rejected_total", reason="resource_exhausted") == before + 2
        # The pinned adapters still serve, and unpinning one lets c in.
        assert len(s.gen.Generate(req("a", 4), timeout=SLOW).token_ids) == 4
        s.adapters.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="b"), timeout=SLOW)
        assert len(s.gen.Generate(req("c", 4), timeout=SLOW).token_ids) == 4


def test_a_waiting_request_whose_adapter_is_deleted_counts_as_rejected(adapters, tiny_llama_dir, tmp_path):
    with ServerThread(tiny_llama_dir, store=store_of(adapters, tmp_path), max_device_adapters=1) as s:
        holder = running_on(s, "a")
        before = {
            "rejected": metric(s, "loramux_requests_total", status="rejected"),
            "not_found": metric(s, "loramux_requests_rejected_total", reason="not_found"),
            "error": metric(s, "loramux_requests_total", status="error"),
        }
        waiter = reserve_for(s, "b")  # it waits for the only slot
        s.adapters.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="b"), timeout=SLOW)
        with pytest.raises(grpc.RpcError) as e:
            waiter.result(timeout=SLOW)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert metric(s, "loramux_requests_total", status="rejected") == before["rejected"] + 1
        assert metric(s, "loramux_requests_rejected_total", reason="not_found") == before["not_found"] + 1
        assert metric(s, "loramux_requests_total", status="error") == before["error"]
        assert reservations(s) == [None]
        holder.cancel()
