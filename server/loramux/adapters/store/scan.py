"""What the store does at startup: recover from interrupted overwrites, read (and re-manifest) each directory."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from loramux.adapters.formats.detect import CONFIG_FILE
from loramux.adapters.store.layout import (
    ADAPTER_ID_RE,
    MANIFEST_FILE,
    REPLACED_PREFIX,
    SHA256_RE,
    StoredAdapter,
    remove,
    sha256_file,
    weights_file_for,
    write_manifest,
)
from loramux.adapters.store.safetensors_check import check_safetensors
from loramux.adapters.store.upload import InvalidUpload, Validator

log = logging.getLogger("loramux.adapters.store")


def recover_trash(root: Path, entry: Path) -> None:
    """Put back an old adapter directory that an interrupted overwrite left in the trash; else remove the entry."""
    # `replaced-<hex>-<id>`: an overwrite that moved the old dir aside and crashed
    # before the new one was renamed in. Put the old one back.
    name = entry.name
    if name.startswith(REPLACED_PREFIX) and (entry / MANIFEST_FILE).is_file():
        target = root / name[len(REPLACED_PREFIX) :].partition("-")[2]
        if ADAPTER_ID_RE.fullmatch(target.name) and not target.exists():
            os.rename(entry, target)
            log.warning("adapter store: restored %s after an interrupted overwrite", target.name)
            return
    remove(entry)


def read_adapter_dir(path: Path, version: int, classify: Validator | None) -> StoredAdapter:
    """The record of the adapter directory `path`; a missing or stale manifest is rewritten (hashing the weights)."""
    adapter_id = path.name
    refuse_links(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except RecursionError:
        raise InvalidUpload(f"{CONFIG_FILE} is nested too deeply") from None
    if not isinstance(config, dict):
        raise InvalidUpload(f"{CONFIG_FILE} is not a JSON object")
    weights_file = weights_file_for(config)
    st = (path / weights_file).stat()
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        manifest = {}
    if not isinstance(manifest, dict):
        manifest = {}
    # Size and mtime catch weights replaced by hand without hashing every file at startup.
    fresh = (
        manifest.get("weights_file") == weights_file
        and manifest.get("weights_size") == st.st_size
        and manifest.get("weights_mtime_ns") == st.st_mtime_ns
        and isinstance(manifest.get("weights_sha256"), str)
        and SHA256_RE.fullmatch(manifest["weights_sha256"]) is not None
    )
    created = manifest.get("created_unix_ms")
    record = StoredAdapter(
        adapter_id=adapter_id,
        path=path,
        config=config,
        weights_file=weights_file,
        sha256=manifest["weights_sha256"] if fresh else "",
        size=st.st_size,
        created_unix_ms=created if isinstance(created, int) else int(time.time() * 1000),
        version=version,
        adapter_type=manifest.get("adapter_type") if fresh else None,
    )
    if not fresh:
        check_safetensors(record.weights_path)
        record = replace(record, sha256=sha256_file(record.weights_path))
    if record.adapter_type is None and classify is not None:
        record = replace(record, adapter_type=classify(config, record.weights_path))
    if not fresh or record.adapter_type != manifest.get("adapter_type") or manifest.get("adapter_id") != adapter_id:
        persist_manifest(record)
    return record


def refuse_links(path: Path) -> None:
    """Refuse an adapter directory that is a symbolic link or holds one: the store never reads or
    writes (its manifest) outside its root."""
    if path.is_symlink():
        raise InvalidUpload(f"{path.name} is a symbolic link; the store never follows links out of its root")
    root = path.parent.resolve()
    for child in path.iterdir():
        if child.is_symlink() or not child.resolve().is_relative_to(root):
            raise InvalidUpload(f"{path.name}/{child.name} is a symbolic link; the store never follows links")


def persist_manifest(record: StoredAdapter) -> None:
    try:
        write_manifest(record)
    except OSError as e:  # a read-only store still serves; it just rehashes at the next start
        log.warning("adapter store: cannot write the manifest of %s: %s", record.adapter_id, e)
