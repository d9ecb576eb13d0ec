"""The durable on-disk adapter store: `<root>/<adapter_id>/` per adapter (layout: layout.py).

Readers never see a partial adapter: a directory appears in place only by one
rename of a complete, fsynced staging directory; an overwrite swaps the two
directories atomically (renameat2 RENAME_EXCHANGE where the OS has it). Mutations
of one id are serialised by a per-id lock; `reading(id)` takes the same lock, so a
loader's files cannot change under it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from loramux.adapters.formats.detect import CONFIG_FILE
from loramux.adapters.store.errors import AdapterNotFound, AlreadyExists
from loramux.adapters.store.id_locks import IdLocks
from loramux.adapters.store.layout import (
    ADAPTER_ID_RE,
    MANIFEST_FILE,
    REPLACED_PREFIX,
    SHA256_RE,
    STAGING,
    TRASH,
    InvalidAdapterId,
    StoredAdapter,
    exchange,
    fsync_dir,
    fsync_file,
    remove,
    validate_adapter_id,
    weights_file_for,
    write_manifest,
)
from loramux.adapters.store.safetensors_check import InvalidWeightsFile
from loramux.adapters.store.scan import persist_manifest, read_adapter_dir, recover_trash
from loramux.adapters.store.upload import (
    ChecksumMismatch,
    InvalidUpload,
    SizeMismatch,
    UploadSession,
    UploadTooLarge,
    Validator,
)

# The registry imports everything it maps to gRPC codes from here.
__all__ = [
    "AdapterNotFound",  # NOT_FOUND
    "AdapterStore",
    "AlreadyExists",  # ALREADY_EXISTS
    "ChecksumMismatch",  # INVALID_ARGUMENT (like every AdapterError / ValueError below)
    "InvalidAdapterId",
    "InvalidUpload",
    "InvalidWeightsFile",
    "SizeMismatch",
    "StoredAdapter",
    "UploadSession",
    "UploadTooLarge",  # RESOURCE_EXHAUSTED
    "validate_adapter_id",
]

log = logging.getLogger("loramux.adapters.store")


class AdapterStore:
    """Thread-safe store over `root`. Call `scan()` once at startup, before serving."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._staging = self.root / STAGING
        self._trash = self.root / TRASH
        for d in (self.root, self._staging, self._trash):
            if d is not self.root and d.is_symlink():  # never clean (delete in) a directory outside the store
                log.warning("adapter store: %s is a symbolic link; replacing it with a directory", d)
                d.unlink()
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the dicts below and the version counter
        self._records: dict[str, StoredAdapter] = {}
        self._id_lock = IdLocks()  # mutations of one id, and reading(id), one at a time
        self._active_staging: set[str] = set()
        self._version = 0
        self._seen: dict[str, tuple[int, int]] = {}  # id -> (inode, mtime_ns) of the manifest refresh() read

    # ---- reads -------------------------------------------------------------

    def get(self, adapter_id: str) -> StoredAdapter:
        validate_adapter_id(adapter_id)
        with self._lock:
            record = self._records.get(adapter_id)
        if record is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} not found")
        return record

    def exists(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._records  # an invalid id is never a key

    def list(self) -> list[StoredAdapter]:
        with self._lock:
            return [self._records[k] for k in sorted(self._records)]

    @contextmanager
    def reading(self, adapter_id: str) -> Iterator[StoredAdapter]:
        """Yield the current record; its files stay as they are until the block exits.

        Uploads and deletes of this id wait meanwhile, so a loader never mixes
        two versions or loses files half-way.
        """
        with self._id_lock(validate_adapter_id(adapter_id)):
            yield self.get(adapter_id)

    def set_adapter_type(self, adapter_id: str, adapter_type: str, sha256: str) -> StoredAdapter:
        """Record a type computed later (e.g. for a hand-placed adapter); ignored if sha256 is stale."""
        with self._id_lock(validate_adapter_id(adapter_id)):
            record = self.get(adapter_id)
            if record.sha256 != sha256 or record.adapter_type == adapter_type:
                return record
            record = replace(record, adapter_type=adapter_type)
            persist_manifest(record)
            with self._lock:
                self._records[adapter_id] = record
            return record

    # ---- other writers (one store shared by many processes) ------------------

    def refresh(self, adapter_id: str) -> StoredAdapter | None:
        """Re-read `adapter_id` if another process published or deleted it; its record, or None.

        Each replica of a cluster has its own AdapterStore over one shared directory;
        its records change only through its own uploads and deletes. Another process
        publishes by renaming a complete directory in place, which gives the manifest a
        new inode, so one stat tells whether this process's record is current.
        """
        validate_adapter_id(adapter_id)
        path = self.root / adapter_id
        with self._id_lock(adapter_id):
            try:
                st = (path / MANIFEST_FILE).stat()
                seen = (st.st_ino, st.st_mtime_ns)
            except FileNotFoundError:
                seen = None
            with self._lock:
                record = self._records.get(adapter_id)
                if seen is not None and record is not None and self._seen.get(adapter_id) == seen:
                    return record
            if seen is None and not path.is_dir():
                record = None
            else:
                try:
                    record = self._load_dir(adapter_id, None)
                    st = (path / MANIFEST_FILE).stat()  # _load_dir may have (re)written it
                    seen = (st.st_ino, st.st_mtime_ns)
                except (OSError, ValueError) as e:  # unusable as it is now: serve it no more
                    log.warning("adapter store: %s is unusable: %s", adapter_id, e)
                    record = None
            with self._lock:
                if record is None:
                    self._records.pop(adapter_id, None)
                    self._seen.pop(adapter_id, None)
                else:
                    self._records[adapter_id] = record
                    self._seen[adapter_id] = seen
            return record

    def refresh_all(self) -> list[StoredAdapter]:
        """`refresh` every id on disk or in the records (for a listing); returns `list()`."""
        with self._lock:
            ids = set(self._records)
        ids.update(e.name for e in self.root.iterdir() if ADAPTER_ID_RE.fullmatch(e.name) and e.is_dir())
        for adapter_id in sorted(ids):
            self.refresh(adapter_id)
        return self.list()

    # ---- startup -----------------------------------------------------------

    def scan(self, classify: Validator | None = None) -> list[StoredAdapter]:
        """Clean leftovers, then (re)load every adapter directory; returns `list()`.

        A directory without a manifest (a PEFT `save_pretrained` dropped in by
        hand) gets one, after its weights pass the safetensors check. `classify`,
        if given, fills adapter_type where the manifest has none; a directory it
        rejects is skipped with a warning, as is anything else unusable.
        """
        with self._lock:
            active = set(self._active_staging)
        for entry in self._staging.iterdir():
            if entry.name not in active:
                remove(entry)
        for entry in self._trash.iterdir():
            recover_trash(self.root, entry)
        records: dict[str, StoredAdapter] = {}
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                records[entry.name] = self._load_dir(validate_adapter_id(entry.name), classify)
            except (OSError, ValueError) as e:
                log.warning("adapter store: skipping %s: %s", entry, e)
            except Exception:  # one broken adapter (or classifier bug) must not stop the server starting
                log.exception("adapter store: skipping %s", entry)
        with self._lock:
            self._records = records
        return self.list()

    def _load_dir(self, adapter_id: str, classify: Validator | None) -> StoredAdapter:
        return read_adapter_dir(self.root / adapter_id, self._next_version(), classify)

    # ---- uploads -----------------------------------------------------------

    def begin_upload(
        self, adapter_id: str, config_json: str, sha256: str, size: int, overwrite: bool, max_bytes: int
    ) -> UploadSession[StoredAdapter]:
        """Check the manifest and open a staging directory; the weights come by `write()`."""
        validate_adapter_id(adapter_id)
        if not isinstance(size, int) or size < 0:
            raise InvalidUpload(f"weights_size must be a non-negative integer, got {size!r}")
        if size > max_bytes:
            raise UploadTooLarge(f"adapter {adapter_id!r}: weights_size {size} is over the limit of {max_bytes} bytes")
        if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
            raise InvalidUpload(f"weights_sha256 must be 64 hex digits, got {sha256!r}")
        try:
            config = json.loads(config_json)
        except (TypeError, ValueError) as e:
            raise InvalidUpload(f"config_json is not valid JSON: {e}") from None
        except RecursionError:
            raise InvalidUpload("config_json is nested too deeply") from None
        if not isinstance(config, dict):
            raise InvalidUpload("config_json must be a JSON object")
        weights_file = weights_file_for(config)
        # Fail fast so the client does not stream megabytes in vain; publish checks again.
        if not overwrite and (self.root / adapter_id).exists():
            raise AlreadyExists(f"adapter {adapter_id!r} already exists (set overwrite to replace it)")

        name = secrets.token_hex(16)
        staging_dir = self._staging / name
        staging_dir.mkdir()
        with self._lock:
            self._active_staging.add(name)
        try:
            (staging_dir / CONFIG_FILE).write_text(config_json, encoding="utf-8")
            return UploadSession(
                adapter_id, staging_dir, weights_file, config, sha256.lower(), size, overwrite,
                publish=self._publish, on_close=self._release_staging,
            )  # fmt: skip
        except BaseException:
            remove(staging_dir)
            self._release_staging_name(name)
            raise

    def _release_staging(self, session: UploadSession[StoredAdapter]) -> None:
        self._release_staging_name(session.staging_dir.name)

    def _release_staging_name(self, name: str) -> None:
        with self._lock:
            self._active_staging.discard(name)

    def _publish(self, session: UploadSession[StoredAdapter], adapter_type: str) -> StoredAdapter:
        staging, adapter_id = session.staging_dir, session.adapter_id
        target = self.root / adapter_id
        with self._id_lock(adapter_id):
            if not session.overwrite and target.exists():
                raise AlreadyExists(f"adapter {adapter_id!r} already exists (set overwrite to replace it)")
            record = StoredAdapter(
                adapter_id=adapter_id,
                path=target,
                config=session.config,
                weights_file=session.weights_file,
                sha256=session.sha256,
                size=session.size,
                created_unix_ms=int(time.time() * 1000),
                version=self._next_version(),
                adapter_type=adapter_type,
            )
            fsync_file(staging / CONFIG_FILE)  # the session already fsynced the weights
            # The manifest records the staging file's mtime (rename keeps it) and its
            # atomic write fsyncs the staging directory, making all three entries durable.
            write_manifest(record, directory=staging)
            old: Path | None = None
            if target.exists():
                old = self._trash / f"{REPLACED_PREFIX}{secrets.token_hex(8)}-{adapter_id}"
                if exchange(staging, target):
                    os.rename(staging, old)  # staging now holds the previous adapter
                else:
                    os.rename(target, old)
                    try:
                        os.rename(staging, target)
                    except OSError:
                        os.rename(old, target)  # keep the previous adapter in place
                        raise
            else:
                os.rename(staging, target)
            fsync_dir(self.root)
            with self._lock:
                self._records[adapter_id] = record
        if old is not None:
            remove(old)
        return record

    # ---- delete ------------------------------------------------------------

    def delete(self, adapter_id: str) -> StoredAdapter:
        """Remove an adapter; returns its last record. AdapterNotFound if there is none."""
        validate_adapter_id(adapter_id)
        with self._id_lock(adapter_id):
            record = self.get(adapter_id)
            doomed = self._trash / f"deleted-{secrets.token_hex(8)}-{adapter_id}"
            try:
                os.rename(record.path, doomed)
                fsync_dir(self.root)
            except FileNotFoundError:  # removed by hand since the scan: forget it all the same
                pass
            with self._lock:
                self._records.pop(adapter_id, None)
        remove(doomed)
        return record

    # ---- helpers -----------------------------------------------------------

    def _next_version(self) -> int:
        with self._lock:
            self._version += 1
            return self._version
