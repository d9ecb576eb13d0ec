"""vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter over the adapter store.

Loading reads an adapter directory from the server's own filesystem, so it is
confined to `--allowed-adapter-dir` (the endpoint is off without it): the path and
every file read are resolved (symlinks followed) and must lie under that directory.
The files then go through exactly what an upload goes through: the same staging
session, size limit, safetensors check, sha256 check and parse against the base
model, and the same publish. Unloading deletes the adapter from the store, as vLLM's
unload removes it from the served models.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc

from loramux.adapters.formats.detect import CONFIG_FILE, config_from_json
from loramux.adapters.store.layout import weights_file_for
from loramux.adapters.store.upload import UploadTooLarge
from loramux.api.adapters import AdaptersService
from loramux.http.errors import HttpError

CHUNK_BYTES = 1 << 20


class LoraLoader:
    def __init__(self, adapters: AdaptersService, allowed_dir: Path | None) -> None:
        self.adapters = adapters
        self.root = Path(allowed_dir).resolve(strict=True) if allowed_dir is not None else None

    def confined(self, path: Path) -> Path:
        """`path` with every symlink resolved, if it lies under the allowed directory and exists.

        Confinement is checked before existence, so nothing outside says whether it exists."""
        try:
            real = path.resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise HttpError(
                grpc.StatusCode.INVALID_ARGUMENT, f"lora_path {str(path)!r} cannot be read: {e}", "lora_path"
            ) from None
        if self.root is None or not real.is_relative_to(self.root):
            raise HttpError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"lora_path {str(path)!r} is outside the allowed adapter directory",
                "lora_path",
            )
        if not real.exists():
            raise HttpError(
                grpc.StatusCode.INVALID_ARGUMENT, f"lora_path {str(path)!r} cannot be read: no such file", "lora_path"
            )
        return real

    def load(self, name: str, lora_path: str) -> None:
        """Executor thread: validate and publish the adapter at `lora_path` under id `name`."""
        if self.root is None:
            raise HttpError(
                grpc.StatusCode.NOT_FOUND,
                "loading adapters by path is off; start the server with --allowed-adapter-dir",
            )
        given = Path(lora_path)
        directory = self.confined(given if given.is_absolute() else self.root / given)
        if not directory.is_dir():
            raise HttpError(
                grpc.StatusCode.INVALID_ARGUMENT, f"lora_path {lora_path!r} is not a directory", "lora_path"
            )
        config_path = self.confined(directory / CONFIG_FILE)
        config_text = config_path.read_text(encoding="utf-8")
        config = config_from_json(config_text)
        weights = self.confined(directory / weights_file_for(config))
        limit = self.adapters.max_bytes
        size = weights.stat().st_size
        if size > limit:
            raise UploadTooLarge(f"adapter {name!r}: {size} bytes is over the limit of {limit} bytes")
        digest = hashlib.sha256()
        with weights.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        store = self.adapters.store
        session = store.begin_upload(name, config_text, digest.hexdigest(), size, False, limit)
        try:
            with weights.open("rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    if session.bytes_received + len(chunk) > limit:
                        raise UploadTooLarge(f"adapter {name!r}: the file grew past {limit} bytes")
                    session.write(chunk)
            self.adapters.finish_upload(session)
        except BaseException:
            session.abort()
            raise

    def unload(self, name: str) -> None:
        """Executor thread: remove the adapter from the store and every cache tier."""
        self.adapters.delete_adapter(name)
