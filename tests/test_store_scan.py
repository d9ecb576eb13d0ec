"""The store's start-up scan: leftovers cleaned, interrupted overwrites restored, hand-placed PEFT dirs adopted."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from store_helpers import MAX, PEFT_CONFIG, internal_empty, lora_validator, sha, upload, weights

from loramux.adapters.kinds.base import AdapterError
from loramux.adapters.store.store import AdapterStore


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    s = AdapterStore(tmp_path / "store")
    s.scan()
    return s


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
