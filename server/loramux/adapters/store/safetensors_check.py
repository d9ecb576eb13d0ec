"""Structural check of a safetensors file before anything parses it as model weights.

Uploaded weights come from clients. A pickle (`torch.save`, `.bin`) can run code
when loaded, and a malformed safetensors header can make a reader allocate or
seek wildly, so every payload is checked here with plain byte reads and `json`
first: nothing in this module imports a tensor library or unpickles anything.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian u64
header length N, N bytes of a UTF-8 JSON object, then the data buffer. Each entry
other than `__metadata__` is `{"dtype", "shape", "data_offsets": [begin, end]}`
relative to the buffer; the entries tile the buffer exactly, with no gaps.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from loramux.adapters.contract import AdapterError

# The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000

# Bits per element; sub-byte types (F4, F6) are valid when a tensor fills whole bytes.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


class InvalidWeightsFile(AdapterError):
    """The weights payload is not a well-formed safetensors file."""


def _reject(path: Path, why: str) -> InvalidWeightsFile:
    return InvalidWeightsFile(f"{path.name}: not a valid safetensors file: {why}")


def _sniff(prefix: bytes) -> str | None:
    """Name well-known non-safetensors formats, so the error tells the user what to do.

    Only asked about a file that failed to parse: a valid safetensors file can begin with
    the same bytes (a header length of 640 is `80 02 00 ...`, a pickle's opening).
    """
    if prefix.startswith(b"PK\x03\x04"):
        return "it is a zip archive (torch.save / pytorch .bin format); only safetensors weights are accepted"
    if prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a Python pickle; only safetensors weights are accepted"
    return None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last duplicate; two readers could then disagree.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_uint(value: Any) -> bool:
    # bool is an int subclass in Python; JSON true must not pass as 1.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: Path, name: str, entry: Any) -> tuple[int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _reject(path, f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise _reject(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise _reject(path, f"tensor {name!r} has a bad shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise _reject(path, f"tensor {name!r} has bad data_offsets {offsets!r}")
    begin, end = offsets
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or end < begin or end - begin != bits // 8:
        raise _reject(path, f"tensor {name!r}: data_offsets {offsets} do not match {dtype}{shape}")
    return begin, end


def check_safetensors(path: Path) -> dict[str, Any]:
    """Raise InvalidWeightsFile unless `path` is a structurally sound safetensors file.

    Returns the parsed header (tensor name -> entry, plus `__metadata__` if present).
    Reads only the header; the data buffer is never touched. A file that does not parse
    and looks like a pickle or a zip archive is refused as that, to tell the user why.
    """
    try:
        return _parse(path)
    except InvalidWeightsFile:
        with path.open("rb") as f:
            sniffed = _sniff(f.read(8))
        if sniffed:
            raise _reject(path, sniffed) from None
        raise


def _parse(path: Path) -> dict[str, Any]:
    file_size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _reject(path, f"only {file_size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len < 2 or header_len > MAX_HEADER_BYTES:
            raise _reject(path, f"header length {header_len} is outside 2..{MAX_HEADER_BYTES}")
        if 8 + header_len > file_size:
            raise _reject(path, f"header length {header_len} runs past the end of the {file_size}-byte file")
        raw = f.read(header_len)
    if raw[:1] != b"{":
        raise _reject(path, "header does not start with a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise _reject(path, f"header is not valid UTF-8 JSON ({e})") from None
    except RecursionError:
        raise _reject(path, "header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise _reject(path, "header is not a JSON object")

    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _reject(path, "__metadata__ must map strings to strings")

    spans = sorted(_check_entry(path, name, e) for name, e in header.items() if name != "__metadata__")
    # The entries must tile the data buffer exactly: no gaps, no overlaps, no trailing bytes.
    cursor = 0
    for begin, end in spans:
        if begin != cursor:
            raise _reject(path, f"tensor data is not contiguous (gap or overlap at byte {begin}, expected {cursor})")
        cursor = end
    buffer_size = file_size - 8 - header_len
    if cursor != buffer_size:
        raise _reject(path, f"tensors cover {cursor} bytes but the data buffer holds {buffer_size}")
    return header
