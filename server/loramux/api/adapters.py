"""The Adapters service: upload, list, get, delete, load and unload adapters while the server runs.

Disk work (staging writes, hashing, parsing, renames) runs in the loop's thread
executor so the event loop keeps serving; every AdapterCache change runs on the
engine thread through `Engine.call`, between forwards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc

from loramux.adapters.cache.adapter_cache import AdapterCache
from loramux.adapters.kinds.base import AdapterInfo
from loramux.adapters.store.store import AdapterStore, InvalidUpload, StoredAdapter, UploadSession, UploadTooLarge
from loramux.api.adapter_infos import AdapterInfos, Describe
from loramux.api.auth import AdminAuth, AdminAuthInterceptor
from loramux.api.errors import status_for
from loramux.api.page_tokens import decode_page_token, encode_page_token
from loramux.engine.engine import Engine
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

log = logging.getLogger("loramux.api")

T = TypeVar("T")

PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX = 100, 1000
LOAD_TIMEOUT_S = 120.0  # LoadAdapter's wait for a device slot when the client sets no deadline
_STATES = {
    "stored": pb.ADAPTER_STATE_STORED,
    "host": pb.ADAPTER_STATE_HOST,
    "device": pb.ADAPTER_STATE_DEVICE,
    "merged": pb.ADAPTER_STATE_MERGED,
}


class AdaptersService(pb_grpc.AdaptersServicer):
    """Registered before the server starts; answers UNAVAILABLE until `attach`."""

    def __init__(self, auth: AdminAuth, max_adapter_bytes: int) -> None:
        """`auth`: the admin token its mutations need; `interceptor()` enforces it, before any handler runs."""
        if max_adapter_bytes <= 0:
            raise ValueError(f"max_adapter_bytes must be > 0, got {max_adapter_bytes}")
        self.auth = auth
        self.max_bytes = max_adapter_bytes
        self.store: AdapterStore | None = None
        self.cache: AdapterCache | None = None
        self.engine: Engine | None = None
        self.describe: Describe | None = None
        self.infos: AdapterInfos | None = None  # what List/Get say of each adapter, parsed once
        self.draining = False  # set by the server's drain: no new uploads then

    def interceptor(self) -> AdminAuthInterceptor:
        """The server interceptor that refuses mutations without the admin token."""
        return AdminAuthInterceptor(self.auth)

    def attach(self, store: AdapterStore, cache: AdapterCache, engine: Engine, describe: Describe) -> None:
        self.store, self.cache, self.describe = store, cache, describe
        self.infos = AdapterInfos(store, cache, describe)
        self.engine = engine  # last: a non-None engine is what marks the service ready

    # ---- RPCs ----------------------------------------------------------------

    async def UploadAdapter(
        self, request_iterator: AsyncIterator[pb.UploadAdapterRequest], context: grpc.aio.ServicerContext
    ) -> pb.Adapter:
        await self._ready(context)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is draining and accepts no new uploads")
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "manifest":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry the manifest")
        m = first.manifest
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(
            None, self.store.begin_upload,
            m.adapter_id, m.config_json, m.weights_sha256, m.weights_size, m.overwrite, self.max_bytes,
        )  # fmt: skip
        try:
            session: UploadSession[StoredAdapter] = await asyncio.shield(opening)
        except asyncio.CancelledError:  # gone while the staging dir was being made: remove it once it exists
            opening.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().abort())
            raise
        except Exception as e:
            await self._refuse(context, e, "UploadAdapter")
        try:
            async for msg in request_iterator:
                if msg.WhichOneof("payload") != "chunk":
                    raise InvalidUpload("only the first message may carry a manifest; later ones carry chunks")
                if session.bytes_received + len(msg.chunk) > self.max_bytes:
                    raise UploadTooLarge(f"adapter {m.adapter_id!r}: the stream passed {self.max_bytes} bytes")
                await loop.run_in_executor(None, session.write, msg.chunk)
            # Shielded: once the last byte is in, a cancelled call may still publish, and
            # the cache must then hear about it (_finish does both in one thread job).
            record, info = await asyncio.shield(loop.run_in_executor(None, self.finish_upload, session))
        except BaseException as e:  # a client gone away arrives as CancelledError
            abort = loop.run_in_executor(None, session.abort)  # waits for a write/finish in flight
            try:
                await asyncio.shield(abort)
            except asyncio.CancelledError:
                pass
            if isinstance(e, Exception):
                await self._refuse(context, e, "UploadAdapter")
            raise
        log.info(
            "adapter %s uploaded: %s, %d bytes, sha256 %s",
            record.adapter_id,
            info.adapter_type,
            record.size,
            record.sha256[:12],
        )
        return await self._call(context, self._message, record)

    async def GetAdapter(self, request: pb.GetAdapterRequest, context: grpc.aio.ServicerContext) -> pb.Adapter:
        await self._ready(context)
        return await self._call(context, lambda: self._message(self.store.get(request.adapter_id)))

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        await self._ready(context)
        size = min(request.page_size or PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX)
        after = decode_page_token(request.page_token)
        if after is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_token is not one this server gave out")
        # store.list() is sorted by id, so "after the last id seen" survives uploads and deletes between pages.
        rest = [r for r in self.store.list() if r.adapter_id > after]
        page = rest[:size]
        adapters = await self._call(context, lambda: [self._message(r) for r in page])
        token = encode_page_token(page[-1].adapter_id) if len(rest) > size else ""
        return pb.ListAdaptersResponse(adapters=adapters, next_page_token=token)

    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAdapterResponse:
        await self._ready(context)
        await self._call(context, self.delete_adapter, request.adapter_id)
        log.info("adapter %s deleted", request.adapter_id)
        return pb.DeleteAdapterResponse()

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.Adapter:
        await self._ready(context)
        adapter_id = request.adapter_id
        await self._call(context, self.store.get, adapter_id)  # NOT_FOUND / INVALID_ARGUMENT before any work
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = loop.time() + min(remaining if remaining is not None else LOAD_TIMEOUT_S, LOAD_TIMEOUT_S)
        # prefetch() only starts the load; asking again installs it once the worker is done.
        try:
            while True:
                try:
                    resident, stuck = await asyncio.wrap_future(
                        self.engine.call(lambda: self._prefetch(adapter_id, request.pin, request.merge))
                    )
                except Exception as e:
                    await self._refuse(context, e, "LoadAdapter")
                if resident:
                    break
                if stuck:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"every device slot is pinned; unload an adapter before loading {adapter_id!r}",
                    )
                if loop.time() > deadline:
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED, f"adapter {adapter_id!r} is not resident yet"
                    )
                await asyncio.sleep(0.01)
        finally:  # answered, refused or gone: a slot reservation it made must not outlive it
            self.engine.call(lambda: self.cache.end_prefetch(adapter_id))
        log.info(
            "adapter %s loaded into a device slot%s",
            adapter_id,
            " and merged (pinned)" if request.merge else " and pinned" if request.pin else "",
        )
        return await self._call(context, lambda: self._message(self.store.get(adapter_id)))

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.Adapter:
        await self._ready(context)
        adapter_id = request.adapter_id
        await self._call(context, self.store.get, adapter_id)
        try:
            await asyncio.wrap_future(self.engine.call(lambda: self.cache.unload(adapter_id)))
        except Exception as e:
            await self._refuse(context, e, "UnloadAdapter")
        return await self._call(context, lambda: self._message(self.store.get(adapter_id)))

    # ---- work done off the event loop ----------------------------------------

    def finish_upload(self, session: UploadSession[StoredAdapter]) -> tuple[StoredAdapter, AdapterInfo]:
        """Executor thread: validate + publish, then drop every cached copy of the old weights."""
        seen: list[AdapterInfo] = []

        def validate(config: dict[str, Any], weights_path: Path) -> str:
            info = self.describe(config, weights_path)
            seen.append(info)
            return info.adapter_type

        try:
            old_sha = self.store.get(session.adapter_id).sha256
        except KeyError:
            old_sha = None
        record = session.finish(validate)
        self.infos.forget(record.adapter_id)
        self.infos.remember(record, seen[-1])
        self.engine.call(lambda: self._replace_in_cache(record.adapter_id, old_sha)).result()
        return record, seen[-1]

    def _replace_in_cache(self, adapter_id: str, old_sha: str | None) -> None:
        """Engine thread: forget the old weights; a pin carries over to the new ones."""
        pinned = old_sha is not None and self.cache.state(adapter_id, old_sha)[1]
        self.cache.forget(adapter_id)
        if pinned:
            try:
                self.cache.prefetch(adapter_id, pin=True)  # starts the load; the next acquire installs it
            except Exception as e:  # the upload already succeeded; a failed re-pin is not its error
                log.warning("adapter %s: could not re-pin after the overwrite: %s", adapter_id, e)

    def delete_adapter(self, adapter_id: str) -> None:
        """Executor thread. Running requests keep their leases; release() evicts after the last one."""
        self.store.delete(adapter_id)
        self.infos.forget(adapter_id)
        self.engine.call(lambda: self.cache.forget(adapter_id)).result()

    def _prefetch(self, adapter_id: str, pin: bool, merge: bool = False) -> tuple[bool, bool]:
        """Engine thread: (resident, stuck) where stuck means no slot can ever free up.

        merge=true: resident once merged too; it pins (cache.merge), and a bottleneck or soft-prompt
        adapter, a full merged budget or --merged-cache-mb 0 is a ValueError (INVALID_ARGUMENT)."""
        resident = self.cache.merge(adapter_id, pin=True) if merge else self.cache.prefetch(adapter_id, pin)
        stuck = not resident and self.cache.waiting_for_slot(adapter_id) and all(s.pinned for s in self.cache.slots)
        return resident, stuck

    def _message(self, record: StoredAdapter) -> pb.Adapter:
        info = self.infos.get(record)
        tier, pinned = self.cache.state(record.adapter_id, record.sha256)
        return pb.Adapter(
            adapter_id=record.adapter_id,
            adapter_type=info.adapter_type or record.adapter_type or "",
            rank=info.rank,
            target_modules=info.target_modules,
            size_bytes=record.size,
            sha256=record.sha256,
            state=_STATES.get(tier, pb.ADAPTER_STATE_UNSPECIFIED),
            pinned=pinned,
            created_unix_ms=record.created_unix_ms,
        )

    # ---- helpers ---------------------------------------------------------------

    async def _ready(self, context: grpc.aio.ServicerContext) -> None:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking store work in the executor; a failure aborts the call with its status."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except Exception as e:
            await self._refuse(context, e, getattr(fn, "__name__", "adapters"))

    async def _refuse(self, context: grpc.aio.ServicerContext, e: Exception, what: str) -> NoReturn:
        code = status_for(e)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed: %r", what, e, exc_info=e)
        await context.abort(code, str(e))
        raise AssertionError("unreachable: abort raises")
