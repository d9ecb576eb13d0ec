"""The OpenAI-compatible FastAPI application, over the same engine and store as the gRPC services.

`model` names what serves a call: the base model's served name, or an adapter id.
`/health` needs no key; every /v1 route needs the API key when one is configured;
the adapter-management routes need the admin token when one is configured (else
the API key).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from loramux.api.adapters import AdaptersService
from loramux.api.auth import AdminAuth
from loramux.api.bridge import EventBridge
from loramux.api.errors import status_for
from loramux.engine.engine import Engine
from loramux.http.convert import chat_requests, completion_requests
from loramux.http.errors import HttpError, error_body, error_response, validation_message
from loramux.http.generate import Generation
from loramux.http.lora import LoraLoader
from loramux.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)

T = TypeVar("T")
log = logging.getLogger("loramux.http")


class HttpState:
    """What the routes serve from; `attach` fills it once the model is loaded."""

    def __init__(self, api_key: str | None, admin: AdminAuth, served_model_name: str) -> None:
        self.api_key = api_key.encode() if api_key is not None else None
        self.admin = admin
        self.served_name = served_model_name
        self.engine: Engine | None = None
        self.adapters: AdaptersService | None = None
        self.loader: LoraLoader | None = None
        self.generation: Generation | None = None
        self.serving = False  # set once the server is SERVING, cleared when it drains

    def attach(self, engine: Engine, adapters: AdaptersService, allowed_dir: Path | None, bridge: EventBridge) -> None:
        if not self.served_name:
            self.served_name = engine.base.name
        self.adapters = adapters
        self.loader = LoraLoader(adapters, allowed_dir)
        self.generation = Generation(engine, engine.base.tokenizer, adapters.store.exists, bridge)
        self.engine = engine

    def close(self) -> None:
        """Stop the tokenizer thread (the server's stop)."""
        if self.generation is not None:
            self.generation.prompts.close()

    def adapter_for(self, model: str) -> str:
        """The adapter id a `model` field names ("" = the base model)."""
        return "" if model == self.served_name else model


def read_key(path: Path | None) -> str | None:
    if path is None:
        return None
    key = Path(path).read_text(encoding="utf-8").strip()
    if not key:
        raise ValueError(f"--api-key-file {path} is empty")
    return key


def _bearer(http: HttpRequest) -> str | None:
    value = http.headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


def answers_errors(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A route that answers any exception with OpenAI's error body and its status (and logs INTERNAL ones).

    Starlette's catch-all handler would answer too, but then re-raise and drop the connection."""

    @functools.wraps(fn)
    async def route(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except Exception as e:
            if not isinstance(e, HttpError) and status_for(e) == grpc.StatusCode.INTERNAL:
                log.error("%s failed: %r", fn.__name__, e, exc_info=e)
            return error_response(e)

    return route


def create_app(state: HttpState) -> FastAPI:
    app = FastAPI(title="loramux", docs_url=None, redoc_url=None, openapi_url=None)

    def ready() -> Engine:
        if state.engine is None:
            raise HttpError(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        return state.engine

    async def api_key(http: HttpRequest) -> None:
        if state.api_key is None:
            return
        token = _bearer(http)
        if not token or not hmac.compare_digest(token.encode(), state.api_key):
            raise HttpError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key (Authorization: Bearer <key>)")

    async def admin(http: HttpRequest) -> None:
        if not state.admin.enabled:
            await api_key(http)
            return
        header = http.headers.get("authorization")
        refused = state.admin.refusal([("authorization", header)] if header is not None else [])
        if refused is not None:
            raise HttpError(*refused)

    async def in_executor(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    @app.exception_handler(HttpError)
    async def _http_error(_: HttpRequest, exc: HttpError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return error_response(HttpError(grpc.StatusCode.INVALID_ARGUMENT, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(_: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": exc.status_code}}
        return JSONResponse(body, status_code=exc.status_code)

    @app.get("/health")
    async def health() -> Response:
        if state.engine is None or not state.serving:
            return JSONResponse(error_body("not serving", grpc.StatusCode.UNAVAILABLE), status_code=503)
        return Response(status_code=200)

    @app.get("/v1/models", dependencies=[Depends(api_key)])
    @answers_errors
    async def models() -> dict:
        ready()
        return {"object": "list", "data": await in_executor(_model_cards, state)}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(api_key)])
    @answers_errors
    async def model(model: str) -> dict:
        ready()
        for card in await in_executor(_model_cards, state):
            if card["id"] == model:
                return card
        raise HttpError(grpc.StatusCode.NOT_FOUND, f"The model `{model}` does not exist.", "model")

    @app.post("/v1/completions", dependencies=[Depends(api_key)])
    @answers_errors
    async def completions(body: CompletionRequest, http: HttpRequest) -> Response:
        ready()
        rid = f"cmpl-{uuid.uuid4().hex}"
        msgs = completion_requests(body, state.adapter_for(body.model), rid)
        return await state.generation.respond(
            http, "completion", rid, msgs, body.model, body.n, body.stream, body.include_usage,
            body.logprobs is not None,
        )  # fmt: skip

    @app.post("/v1/chat/completions", dependencies=[Depends(api_key)])
    @answers_errors
    async def chat(body: ChatCompletionRequest, http: HttpRequest) -> Response:
        ready()
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        msgs = chat_requests(body, state.adapter_for(body.model), rid)
        return await state.generation.respond(
            http, "chat", rid, msgs, body.model, body.n, body.stream, body.include_usage, body.logprobs
        )

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(admin)])
    @answers_errors
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> Response:
        ready()
        if state.adapters.draining:
            raise HttpError(grpc.StatusCode.UNAVAILABLE, "the server is draining and loads no new adapters")
        if body.lora_name == state.served_name:
            raise HttpError(grpc.StatusCode.INVALID_ARGUMENT, "lora_name is the base model's name", "lora_name")
        await in_executor(state.loader.load, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(admin)])
    @answers_errors
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> Response:
        ready()
        await in_executor(state.loader.unload, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _model_cards(state: HttpState) -> list[dict]:
    """The base model, then every stored adapter with the base as its parent (as vLLM lists LoRAs)."""
    engine = state.engine
    base = {
        "id": state.served_name,
        "object": "model",
        "created": 0,
        "owned_by": "loramux",
        "root": engine.base.name,
        "parent": None,
        "max_model_len": engine.max_len,
    }
    cards = [base]
    for r in state.adapters.store.list():
        cards.append(
            {
                "id": r.adapter_id,
                "object": "model",
                "created": r.created_unix_ms // 1000,
                "owned_by": "loramux",
                "root": r.adapter_id,
                "parent": state.served_name,
                "max_model_len": engine.max_len,
            }
        )
    return cards
