"""The on-disk adapter store: ids, uploads, safetensors checks, scan, overwrite, delete, concurrency."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save, save_file

from loramux.adapters.kinds.base import AdapterError
from loramux.adapters.store import store as store_module
from loramux.adapters.store.layout import InvalidAdapterId, exchange, validate_adapter_id
from loramux.adapters.store.safetensors_check import InvalidWeightsFile, check_safetensors
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

PEFT_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
HUB_CONFIG = {"name": "a", "config": {"architecture": "bottleneck", "reduction_factor": 16}}
MAX = 1 << 20


def weights(seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save({"a": torch.randn(2, 8, generator=g), "b": torch.randn(8, 2, generator=g)})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lora_validator(calls: list[Path] | None = None) -> Any:
    def validate(config: dict[str, Any], path: Path) -> str:
        if calls is not None:
            calls.append(path)
        assert (path.parent / "adapter_config.json").is_file()  # the parser may read the directory
        return "lora"

    return validate


def upload(
    store: AdapterStore,
    adapter_id: str,
    data: bytes,
    config: dict[str, Any] = PEFT_CONFIG,
    overwrite: bool = False,
    validate: Any = None,
    chunk: int = 100,
) -> StoredAdapter:
    session = store.begin_upload(adapter_id, json.dumps(config), sha(data), len(data), overwrite, MAX)
    with session:
        for i in range(0, len(data), chunk):
            session.write(data[i : i + chunk])
        return session.finish(validate or lora_validator())


def internal_empty(root: Path) -> bool:
    return not any((root / ".staging").iterdir()) and not any((root / ".trash").iterdir())


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


class _Marker:
    """Unpickling this creates a file: proof that something ran the payload."""

    path = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("kind", ["torch.save", "raw pickle"])
def test_pickle_payload_is_refused_unread(store: AdapterStore, tmp_path: Path, kind: str) -> None:
    marker_file = tmp_path / "pwned"
    marker = _Marker()
    marker.path = str(marker_file)
    if kind == "torch.save":
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(2), "evil": marker}, buf)
        data = buf.getvalue()
        assert data.startswith(b"PK")
        match = "zip archive"
    else:
        data = pickle.dumps(marker, protocol=4)
        match = "pickle"
    calls: list[Path] = []
    with pytest.raises(InvalidWeightsFile, match=match):
        upload(store, "evil", data, validate=lora_validator(calls))
    assert calls == []  # the format parser never saw it
    assert not marker_file.exists()
    assert not store.exists("evil") and internal_empty(store.root)


def _header_file(tmp_path: Path, header: Any, buffer: bytes = b"", raw: bytes | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + buffer)
    return path


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "header, buffer, raw, match",
    [
        (None, b"", b"", "header length 0"),
        (None, b"", b"[1]", "JSON object"),
        (None, b"", b"{nope", "not valid UTF-8 JSON"),
        (None, b"", b'{"a": 1, "a": 2}', "duplicate key"),
        ({"t": F32_2}, b"\0" * 4, None, "cover 8 bytes but the data buffer holds 4"),  # offsets past the end
        ({"t": F32_2}, b"\0" * 9, None, "buffer holds 9"),  # trailing bytes
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "do not match"),
        ({"t": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "bad shape"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "do not match"),
        ({"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "exactly dtype"),
        ({"t": F32_2, "u": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, b"\0" * 24, None, "contiguous"),
        ({"t": F32_2, "u": F32_2}, b"\0" * 8, None, "contiguous"),  # overlap
        ({"t": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "bad shape"),
        ({"__metadata__": {"k": 1}, "t": F32_2}, b"\0" * 8, None, "__metadata__"),
    ],
)
def test_garbage_headers(tmp_path: Path, header: Any, buffer: bytes, raw: bytes | None, match: str) -> None:
    with pytest.raises(InvalidWeightsFile, match=match):
        check_safetensors(_header_file(tmp_path, header, buffer, raw))


def test_header_length_past_end_and_short_file(tmp_path: Path) -> None:
    path = tmp_path / "w"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(InvalidWeightsFile, match="outside"):
        check_safetensors(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(InvalidWeightsFile, match="past the end"):
        check_safetensors(path)
    path.write_bytes(b"abc")
    with pytest.raises(InvalidWeightsFile, match="shorter"):
        check_safetensors(path)


def test_real_safetensors_files_pass(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    tensors = {
        "empty": torch.zeros(0, 3),
        "bf16": torch.ones(3, 5, dtype=torch.bfloat16),
        "i64": torch.arange(7),
        "bool": torch.ones(3, dtype=torch.bool),
        "scalar": torch.tensor(1.5),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = check_safetensors(path)
    assert set(header) == set(tensors) | {"__metadata__"}


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


# ---- scan ------------------------------------------------------------------


def test_scan_cleans_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "store"
    AdapterStore(root)
    (root / ".staging" / "abc").mkdir()
    (root / ".staging" / "abc" / "adapter_model.safetensors").write_bytes(b"partial")
    (root / ".trash" / "deleted-0123456789abcdef-x").mkdir()
    (root / ".trash" / "stray").write_bytes(b"")
    store = AdapterStore(root)
    assert store.scan() == []
    assert internal_empty(root)


def test_scan_keeps_uploads_in_progress(store: AdapterStore) -> None:
    data = weights()
    session = store.begin_upload("x", json.dumps(PEFT_CONFIG), sha(data), len(data), False, MAX)
    session.write(data[:10])
    store.scan()
    session.write(data[10:])
    assert session.finish(lora_validator()).sha256 == sha(data)


def test_scan_restores_an_interrupted_fallback_overwrite(store: AdapterStore) -> None:
    rec = upload(store, "x", weights())
    # The fallback moved the old dir aside, then the process died before renaming the new one in.
    os.rename(rec.path, store.root / ".trash" / "replaced-0123456789abcdef-x")
    (store.root / ".trash" / "replaced-0123456789abcdef-y").mkdir()  # no manifest: not a whole adapter
    restored = AdapterStore(store.root).scan()
    assert [(r.adapter_id, r.sha256) for r in restored] == [("x", rec.sha256)]
    assert internal_empty(store.root)


def _hand_placed(root: Path, name: str, data: bytes, config: dict[str, Any] = PEFT_CONFIG) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps(config))
    (d / "adapter_model.safetensors").write_bytes(data)
    return d


def test_hand_placed_peft_dir_gets_a_manifest(tmp_path: Path) -> None:
    root = tmp_path / "store"
    d = _hand_placed(root, "by-hand", weights())
    seen: list[Path] = []
    store = AdapterStore(root)
    [rec] = store.scan(classify=lora_validator(seen))
    assert rec.sha256 == sha(weights()) and rec.adapter_type == "lora" and seen == [rec.weights_path]
    manifest = json.loads((d / "loramux_manifest.json").read_text())
    assert manifest["weights_sha256"] == rec.sha256 and manifest["adapter_type"] == "lora"
    # Next start: the manifest is fresh, so no rehash and no classify.
    seen.clear()
    [again] = AdapterStore(root).scan(classify=lora_validator(seen))
    assert seen == [] and again.sha256 == rec.sha256
    # Weights replaced by hand: the stale manifest is noticed and rewritten.
    (d / "adapter_model.safetensors").write_bytes(weights(5) + b"")
    os.utime(d / "adapter_model.safetensors", ns=(1, 1))
    [changed] = AdapterStore(root).scan()
    assert changed.sha256 == sha(weights(5)) and changed.adapter_type is None


def test_real_peft_save_pretrained_dir(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    root = tmp_path / "store"
    lora.save_pretrained(str(root / "real"))
    store = AdapterStore(root)
    [rec] = store.scan()
    assert rec.config["peft_type"] == "LORA" and rec.adapter_type is None
    rec = store.set_adapter_type("real", "lora", rec.sha256)
    assert AdapterStore(root).scan()[0].adapter_type == "lora"


def test_scan_skips_what_it_cannot_serve(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    _hand_placed(root, "ok", weights())
    _hand_placed(root, "bad name", weights())
    _hand_placed(root, "pickled", b"\x80\x04garbage")
    bin_only = root / "bin-only"
    bin_only.mkdir()
    (bin_only / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG))
    (bin_only / "adapter_model.bin").write_bytes(b"PK\x03\x04")
    _hand_placed(root, "rejected", weights())
    (root / "loose-file").write_text("x")

    def classify(config: dict[str, Any], path: Path) -> str:
        if path.parent.name == "rejected":
            raise AdapterError("targets nothing")
        return "lora"

    assert [r.adapter_id for r in AdapterStore(root).scan(classify=classify)] == ["ok"]
    text = caplog.text
    assert "bad name" in text and "pickle" in text and "adapter_model.safetensors" in text and "targets nothing" in text


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
