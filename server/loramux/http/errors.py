"""OpenAI's error body and the HTTP status of every failure, from the same table as gRPC's."""

from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

from loramux.api.errors import status_for
from loramux.engine.request import InvalidParameter

# The gRPC status a failure maps to (DESIGN.md's table) -> the HTTP status and OpenAI's error type.
_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "BadRequestError"),
    grpc.StatusCode.ALREADY_EXISTS: (400, "BadRequestError"),  # vLLM: loading a name already loaded is a 400
    grpc.StatusCode.UNAUTHENTICATED: (401, "AuthenticationError"),
    grpc.StatusCode.PERMISSION_DENIED: (401, "AuthenticationError"),
    grpc.StatusCode.NOT_FOUND: (404, "NotFoundError"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "RateLimitError"),
    grpc.StatusCode.UNAVAILABLE: (503, "ServiceUnavailableError"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "TimeoutError"),
}
_INTERNAL = (500, "InternalServerError")
# The engine's name for a parameter -> the request body's (the rest are spelled alike).
_BODY_NAMES = {"max_new_tokens": "max_tokens"}


class HttpError(Exception):
    """A failure with its gRPC-table status, raised by the routes and rendered by `error_response`."""

    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def http_status(code: grpc.StatusCode) -> tuple[int, str]:
    return _HTTP.get(code, _INTERNAL)


def error_body(message: str, code: grpc.StatusCode, param: str | None = None) -> dict:
    status, kind = http_status(code)
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON response for any exception raised while serving a request."""
    if isinstance(exc, HttpError):
        code, param = exc.code, exc.param
    elif isinstance(exc, InvalidParameter):  # the engine's one validation, shared with gRPC
        code, param = status_for(exc), _BODY_NAMES.get(exc.param, exc.param)
    else:
        code, param = status_for(exc), None
    status, _ = http_status(code)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(str(exc), code, param), status_code=status, headers=headers)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable sentence for pydantic's errors, and the parameter it names."""
    parts, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or (loc[0] if loc else None)
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request body", param
