"""Where the adapter store keeps what, and the file operations that keep it consistent.

`<root>/<adapter_id>/` holds `adapter_config.json`, the safetensors weights
(`adapter_model.safetensors` for PEFT, `adapter.safetensors` for AdapterHub) and
`loramux_manifest.json`. Names starting with `.` are internal: `.staging/`
(uploads in progress) and `.trash/` (directories being removed).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramux.adapters.contract import AdapterError
from loramux.adapters.formats.detect import UnknownFormat, weights_name
from loramux.adapters.store.upload import InvalidUpload
from loramux.logs import clip

# fullmatch, not match with `$`: `$` also matches before a trailing newline.
ADAPTER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
MANIFEST_FILE = "loramux_manifest.json"
STAGING, TRASH = ".staging", ".trash"
# Trash entries of an overwrite without RENAME_EXCHANGE; scan() restores them if the
# crash came before the new directory was in place.
REPLACED_PREFIX = "replaced-"


class InvalidAdapterId(AdapterError):
    """An adapter id outside the contract's pattern (INVALID_ARGUMENT)."""


def validate_adapter_id(adapter_id: object) -> str:
    """Return `adapter_id` if it matches the contract's pattern, else raise InvalidAdapterId.

    Every path built from an id goes through this first; the pattern admits no
    `/`, no leading `.` (so no `.`, `..` or our internal dirs) and no control chars.
    """
    if not isinstance(adapter_id, str) or not ADAPTER_ID_RE.fullmatch(adapter_id):
        raise InvalidAdapterId(
            f"invalid adapter id {clip(adapter_id) if isinstance(adapter_id, str) else type(adapter_id).__name__}: "
            "it must be 1-128 characters of letters, digits, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return adapter_id


def weights_file_for(config: dict[str, Any]) -> str:
    """The weights file name the config's format uses (formats/detect.py decides it)."""
    try:
        return weights_name(config)
    except UnknownFormat as e:
        raise InvalidUpload(str(e)) from None


@dataclass(frozen=True)
class StoredAdapter:
    """One published adapter. Caches key on (adapter_id, sha256); `version` orders publishes."""

    adapter_id: str
    path: Path
    config: dict[str, Any]  # parsed adapter_config.json; do not mutate
    weights_file: str
    sha256: str
    size: int
    created_unix_ms: int
    version: int  # increases with every publish or scan in this process
    adapter_type: str | None = None  # None until a validator classified it (set_adapter_type)

    @property
    def weights_path(self) -> Path:
        return self.path / self.weights_file


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_manifest(record: StoredAdapter, directory: Path | None = None) -> None:
    directory = directory or record.path
    st = (directory / record.weights_file).stat()
    manifest = {
        "adapter_id": record.adapter_id,
        "adapter_type": record.adapter_type,
        "weights_file": record.weights_file,
        "weights_sha256": record.sha256,
        "weights_size": record.size,
        "weights_mtime_ns": st.st_mtime_ns,
        "created_unix_ms": record.created_unix_ms,
    }
    write_json_atomic(directory / MANIFEST_FILE, manifest)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames and creations inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` to `path` so that readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("x", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def remove(path: Path) -> None:
    """Remove a file, symlink or directory tree; missing is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _load_renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 (macOS, musl, Windows)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step; False where the OS or filesystem cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
