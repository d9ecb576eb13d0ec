"""The on-disk adapter store: ids, uploads, overwrite, delete, concurrency.

The safetensors check has test_safetensors_check.py; the start-up scan test_store_scan.py.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from store_helpers import HUB_CONFIG, MAX, PEFT_CONFIG, internal_empty, lora_validator, sha, upload, weights

from loramux.adapters.kinds.base import AdapterError
from loramux.adapters.store import store as store_module
from loramux.adapters.store.layout import InvalidAdapterId, exchange, validate_adapter_id
from loramux.adapters.store.store import (
    AdapterNotFound,
    AdapterStore,
    AlreadyExists,
    StoredAdapter,
)
from loramux.adapters.store.upload import (
    ChecksumMismatch,
    InvalidUpload,
    SizeMismatch,
    UploadClosed,
    UploadTooLarge,
)


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    s = AdapterStore(tmp_path / "store")
    s.scan()
    return s


# ---- ids -------------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "A9", "llama-3_lora.v2", "x" * 128, "0..1"])
def test_good_ids(good: str) -> None:
    assert validate_adapter_id(good) == good


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 129, ".hidden", "x\n", ".", "..", "-a", "a b", "é", 7, None])
def test_bad_ids(bad: Any, store: AdapterStore) -> None:
    with pytest.raises(InvalidAdapterId, match="invalid adapter id"):
        validate_adapter_id(bad)
    assert isinstance(InvalidAdapterId("x"), ValueError)
    with pytest.raises(InvalidAdapterId):
        store.begin_upload(bad, json.dumps(PEFT_CONFIG), sha(b""), 0, False, MAX)
    with pytest.raises(InvalidAdapterId):
        store.get(bad)
    assert not store.exists(bad)


# ---- uploads ---------------------------------------------------------------


def test_upload_round_trip(store: AdapterStore) -> None:
    data = weights()
    calls: list[Path] = []
    rec = upload(store, "demo", data, validate=lora_validator(calls))
    assert len(calls) == 1
    assert rec.adapter_id == "demo" and rec.sha256 == sha(data) and rec.size == len(data)
    assert rec.adapter_type == "lora" and rec.config == PEFT_CONFIG
    assert rec.path == store.root / "demo"
    assert rec.weights_path.read_bytes() == data
    assert json.loads((rec.path / "adapter_config.json").read_text()) == PEFT_CONFIG
    manifest = json.loads((rec.path / "loramux_manifest.json").read_text())
    assert manifest["weights_sha256"] == sha(data) and manifest["adapter_type"] == "lora"
    assert manifest["weights_file"] == "adapter_model.safetensors" and manifest["adapter_id"] == "demo"
    assert store.get("demo") == rec and store.exists("demo") and store.list() == [rec]
    assert internal_empty(store.root)
    # A restart finds it again from the manifest, without the validator.
    again = AdapterStore(store.root).scan()
    assert [(r.adapter_id, r.sha256, r.adapter_type) for r in again] == [("demo", sha(data), "lora")]


def test_adapterhub_config_uses_its_weights_name(store: AdapterStore) -> None:
    rec = upload(store, "hub", weights(), config=HUB_CONFIG, validate=lambda c, p: "bottleneck")
    assert rec.weights_file == "adapter.safetensors" and rec.weights_path.is_file()


def test_list_is_sorted(store: AdapterStore) -> None:
    for name in ["b", "C", "a"]:
        upload(store, name, weights())
    assert [r.adapter_id for r in store.list()] == ["C", "a", "b"]


def test_checksum_mismatch(store: AdapterStore) -> None:
    data = weights()
    session = store.begin_upload("x", json.dumps(PEFT_CONFIG), sha(data + b"!"), len(data), False, MAX)
    session.write(data)
    with pytest.raises(ChecksumMismatch, match="sha256"):
        session.finish(lora_validator())
    assert isinstance(ChecksumMismatch("x"), ValueError)
    assert not store.exists("x") and not (store.root / "x").exists() and internal_empty(store.root)


def test_more_bytes_than_declared(store: AdapterStore) -> None:
    data = weights()
    session = store.begin_upload("x", json.dumps(PEFT_CONFIG), sha(data), len(data) - 1, False, MAX)
    with pytest.raises(SizeMismatch, match="more than the declared"):
        session.write(data)  # refused before it is written
    assert internal_empty(store.root)
    with pytest.raises(UploadClosed):
        session.write(b"more")


def test_fewer_bytes_than_declared(store: AdapterStore) -> None:
    data = weights()
    session = store.begin_upload("x", json.dumps(PEFT_CONFIG), sha(data), len(data) + 1, False, MAX)
    session.write(data)
    with pytest.raises(SizeMismatch, match="declared weights_size"):
        session.finish(lora_validator())
    assert internal_empty(store.root)


def test_over_max_is_refused_before_any_byte(store: AdapterStore) -> None:
    with pytest.raises(UploadTooLarge, match="over the limit"):
        store.begin_upload("x", json.dumps(PEFT_CONFIG), "0" * 64, MAX + 1, False, MAX)
    assert not isinstance(UploadTooLarge("x"), ValueError)  # RESOURCE_EXHAUSTED, not INVALID_ARGUMENT
    assert internal_empty(store.root)


@pytest.mark.parametrize(
    "config_json, sha256, size, match",
    [
        ("{not json", "0" * 64, 10, "not valid JSON"),
        ("[1, 2]", "0" * 64, 10, "JSON object"),
        ('{"r": 8}', "0" * 64, 10, "neither 'peft_type'"),
        (json.dumps(PEFT_CONFIG), "xyz", 10, "64 hex digits"),
        (json.dumps(PEFT_CONFIG), "0" * 63 + "\n", 10, "64 hex digits"),
        (json.dumps(PEFT_CONFIG), "0" * 64, -1, "non-negative"),
    ],
)
def test_bad_manifest(store: AdapterStore, config_json: str, sha256: str, size: int, match: str) -> None:
    with pytest.raises(InvalidUpload, match=match):
        store.begin_upload("x", config_json, sha256, size, False, MAX)
    assert internal_empty(store.root)


def test_abort_leaves_nothing(store: AdapterStore) -> None:
    data = weights()
    session = store.begin_upload("x", json.dumps(PEFT_CONFIG), sha(data), len(data), False, MAX)
    session.write(data[:50])
    assert any((store.root / ".staging").iterdir())
    session.abort()
    session.abort()  # idempotent
    assert internal_empty(store.root) and not store.exists("x")
    with pytest.raises(UploadClosed):
        session.finish(lora_validator())


def test_abort_after_finish_is_a_no_op(store: AdapterStore) -> None:
    data = weights()
    session = store.begin_upload("x", json.dumps(PEFT_CONFIG), sha(data), len(data), False, MAX)
    session.write(data)
    session.finish(lora_validator())
    session.abort()
    assert store.get("x").weights_path.read_bytes() == data


def test_already_exists(store: AdapterStore) -> None:
    upload(store, "x", weights(0))
    with pytest.raises(AlreadyExists):
        upload(store, "x", weights(1))
    assert store.get("x").sha256 == sha(weights(0)) and internal_empty(store.root)


# ---- overwrite -------------------------------------------------------------


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_overwrite_swaps(store: AdapterStore, monkeypatch: pytest.MonkeyPatch, atomic_exchange: bool) -> None:
    if not atomic_exchange:  # the two-rename fallback for systems without RENAME_EXCHANGE
        monkeypatch.setattr(store_module, "exchange", lambda a, b: False)
    old = upload(store, "x", weights(0))
    new = upload(store, "x", weights(1), config=HUB_CONFIG, overwrite=True, validate=lambda c, p: "bottleneck")
    assert new.sha256 == sha(weights(1)) and new.version > old.version and new.adapter_type == "bottleneck"
    assert store.get("x") == new
    assert sorted(p.name for p in new.path.iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
        "loramux_manifest.json",
    ]
    assert internal_empty(store.root)


def test_failing_validate_keeps_the_old_adapter(store: AdapterStore) -> None:
    old = upload(store, "x", weights(0))

    def reject(config: dict[str, Any], path: Path) -> str:
        raise AdapterError("matches no module of the base model")

    with pytest.raises(AdapterError, match="matches no module"):
        upload(store, "x", weights(1), overwrite=True, validate=reject)
    assert store.get("x") == old and old.weights_path.read_bytes() == weights(0)
    assert internal_empty(store.root)


def test_validator_bug_is_not_a_client_error(store: AdapterStore) -> None:
    with pytest.raises(RuntimeError, match="validator returned"):
        upload(store, "x", weights(), validate=lambda c, p: "nonsense")
    assert internal_empty(store.root) and not store.exists("x")


# ---- delete ----------------------------------------------------------------


def test_delete(store: AdapterStore) -> None:
    rec = upload(store, "x", weights())
    assert store.delete("x") == rec
    assert not store.exists("x") and not rec.path.exists() and internal_empty(store.root)
    with pytest.raises(AdapterNotFound, match="'x' not found") as err:
        store.delete("x")
    assert isinstance(err.value, KeyError) and str(err.value) == "adapter 'x' not found"
    with pytest.raises(AdapterNotFound):
        store.get("x")
    upload(store, "x", weights(1))  # the id is free again
    assert AdapterStore(store.root).scan()[0].sha256 == sha(weights(1))


def test_reading_holds_off_mutations(store: AdapterStore) -> None:
    upload(store, "x", weights())
    deleted = threading.Event()

    def delete() -> None:
        store.delete("x")
        deleted.set()

    with store.reading("x") as rec:
        t = threading.Thread(target=delete)
        t.start()
        assert not deleted.wait(0.2)
        assert rec.weights_path.read_bytes() == weights()
    t.join(5)
    assert deleted.is_set() and not store.exists("x")


# ---- concurrency -----------------------------------------------------------


def _race(store: AdapterStore, ids: list[str], overwrite: bool = False) -> list[Any]:
    """Every thread has streamed its payload before any publishes, so the publishes really race."""
    barrier = threading.Barrier(len(ids))
    results: list[Any] = [None] * len(ids)

    def one(i: int) -> None:
        data = weights(i)
        try:
            session = store.begin_upload(ids[i], json.dumps(PEFT_CONFIG), sha(data), len(data), overwrite, MAX)
            session.write(data)
            barrier.wait()
            results[i] = session.finish(lora_validator())
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_uploads_of_one_id_have_one_winner(store: AdapterStore) -> None:
    results = _race(store, ["same"] * 8)
    winners = [r for r in results if isinstance(r, StoredAdapter)]
    assert len(winners) == 1
    assert all(isinstance(r, AlreadyExists) for r in results if r is not winners[0])
    assert store.get("same") == winners[0]
    assert store.get("same").weights_path.read_bytes() in {weights(i) for i in range(8)}
    assert sha(store.get("same").weights_path.read_bytes()) == winners[0].sha256
    assert internal_empty(store.root)


def test_concurrent_overwrites_all_land_and_the_last_stays(store: AdapterStore) -> None:
    results = _race(store, ["same"] * 6, overwrite=True)
    assert all(isinstance(r, StoredAdapter) for r in results)
    last = max(results, key=lambda r: r.version)
    assert store.get("same") == last and sha(last.weights_path.read_bytes()) == last.sha256
    assert internal_empty(store.root)


def test_concurrent_uploads_of_different_ids_all_land(store: AdapterStore) -> None:
    ids = [f"id-{i}" for i in range(8)]
    results = _race(store, ids)
    assert all(isinstance(r, StoredAdapter) for r in results)
    assert [r.adapter_id for r in store.list()] == sorted(ids)
    assert [r.adapter_id for r in AdapterStore(store.root).scan()] == sorted(ids)
    assert internal_empty(store.root)


def test_exchange_swaps_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    if not exchange(a, b):
        pytest.skip("no RENAME_EXCHANGE here; the two-rename fallback is tested above")
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"
