"""The safetensors check: every upload is parsed as safetensors before anything reads it; pickles never run."""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from store_helpers import internal_empty, lora_validator, upload

from loramux.adapters.store.safetensors_check import InvalidWeightsFile, check_safetensors
from loramux.adapters.store.store import AdapterStore


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    s = AdapterStore(tmp_path / "store")
    s.scan()
    return s


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
