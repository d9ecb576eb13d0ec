"""One adapter upload in progress: chunks stream to a staging file, then one publish.

The store (store.py) creates the session with a staging directory that already
holds the config file; the session owns the weights file in it. Nothing is held in
memory but the running sha256. Every failure removes the staging directory, so a
caller that forgets `abort()` after an exception leaks nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from loramux.adapters.contract import ADAPTER_TYPES, AdapterError
from loramux.adapters.store.safetensors_check import check_safetensors

T = TypeVar("T")

# Given the parsed config and the weights path (its directory holds the config file
# too), return the adapter_type or raise ValueError. This is the format parser.
Validator = Callable[[dict[str, Any], Path], str]


class UploadTooLarge(Exception):
    """The declared weights size is over the server's limit (RESOURCE_EXHAUSTED)."""


class InvalidUpload(AdapterError):
    """The upload's manifest is unusable: bad sha256, size or config (INVALID_ARGUMENT)."""


class SizeMismatch(InvalidUpload):
    """The bytes received differ from the declared weights_size (INVALID_ARGUMENT)."""


class ChecksumMismatch(InvalidUpload):
    """The sha256 of the bytes received differs from the declared one (INVALID_ARGUMENT)."""


class UploadClosed(RuntimeError):
    """write/finish after the session finished or was aborted: a caller bug."""


class UploadSession(Generic[T]):
    """Receives one weights file; `finish` checks it and publishes it through the store.

    `publish(session, adapter_type)` is the store's atomic move into place; it
    returns the store's record, which `finish` hands back.
    """

    def __init__(
        self,
        adapter_id: str,
        staging_dir: Path,
        weights_file: str,
        config: dict[str, Any],
        sha256: str,
        size: int,
        overwrite: bool,
        publish: Callable[[UploadSession[T], str], T],
        on_close: Callable[[UploadSession[T]], None],
    ) -> None:
        self.adapter_id = adapter_id
        self.staging_dir = staging_dir
        self.weights_file = weights_file
        self.config = config
        self.sha256 = sha256
        self.size = size
        self.overwrite = overwrite
        self._publish = publish
        self._on_close = on_close
        self._hash = hashlib.sha256()
        self._received = 0
        # One lock for the file and the state: abort() may come from the gRPC
        # cancellation callback while the handler thread is inside write()/finish().
        self._lock = threading.Lock()
        self._closed = False
        self._file = (staging_dir / weights_file).open("xb")

    @property
    def weights_path(self) -> Path:
        return self.staging_dir / self.weights_file

    @property
    def bytes_received(self) -> int:
        return self._received

    def write(self, chunk: bytes) -> None:
        """Append a chunk; SizeMismatch (and cleanup) as soon as it passes the declared size."""
        with self._lock:
            self._check_open()
            if self._received + len(chunk) > self.size:
                self._close_locked()
                raise SizeMismatch(
                    f"adapter {self.adapter_id!r}: received more than the declared weights_size of {self.size} bytes"
                )
            self._file.write(chunk)
            self._hash.update(chunk)
            self._received += len(chunk)

    def finish(self, validate: Validator) -> T:
        """Check size, sha256 and safetensors structure, run `validate`, publish.

        Order matters: the payload is proven to be a safetensors file before
        `validate` (which parses it as model weights) ever sees it.
        Holding the lock throughout means a concurrent abort() waits and then finds
        the session finished: an upload whose last byte arrived may still land.
        """
        with self._lock:
            self._check_open()
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                if self._received != self.size:
                    raise SizeMismatch(
                        f"adapter {self.adapter_id!r}: received {self._received} bytes, "
                        f"declared weights_size is {self.size}"
                    )
                digest = self._hash.hexdigest()
                if digest != self.sha256:
                    raise ChecksumMismatch(
                        f"adapter {self.adapter_id!r}: weights sha256 is {digest}, declared {self.sha256}"
                    )
                check_safetensors(self.weights_path)
                adapter_type = validate(self.config, self.weights_path)
                if adapter_type not in ADAPTER_TYPES:
                    # The validator is server code; a wrong answer is our bug, not the client's.
                    raise RuntimeError(f"validator returned {adapter_type!r}, not one of {ADAPTER_TYPES}")
                return self._publish(self, adapter_type)
            finally:
                # Published or failed, the session is over; after a publish the
                # staging dir is gone (renamed into place) and removal is a no-op.
                self._close_locked()

    def abort(self) -> None:
        """Drop the upload and its staging directory. Idempotent; no-op once finished."""
        with self._lock:
            self._close_locked()

    def __enter__(self) -> UploadSession[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def _check_open(self) -> None:
        if self._closed:
            raise UploadClosed(f"upload of {self.adapter_id!r} is already finished or aborted")

    def _close_locked(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._file.close()
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        self._on_close(self)
