"""Logging setup and the one structured line per finished request.

`setup_logging` is called once by the CLI; nothing here reads the environment
or configures anything at import time, so importing loramux as a library never
touches the host application's logging.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any, TextIO

REQUEST_LOGGER = "loramux.request"
FORMATS = ("text", "json")

# The fields of a request line, in the order they are written.
REQUEST_FIELDS: tuple[str, ...] = (
    "request_id",
    "adapter_id",
    "status",
    "finish_reason",
    "prompt_tokens",
    "generated_tokens",
    "queue_s",
    "ttft_s",
    "total_s",
)
# User content: only ever logged with log_prompts=True. Anything else the caller
# adds (e.g. `error`) is kept, so a failure's cause is on the same line.
CONTENT_FIELDS: frozenset[str] = frozenset(
    {"prompt", "prompt_text", "prompt_token_ids", "text", "output_text", "token_ids", "completion"}
)

_request_log = logging.getLogger(REQUEST_LOGGER)
_log_prompts = False


# The LogRecord attribute that carries a request's fields to the formatters.
_FIELDS_ATTR = "loramux_fields"


def clip(text: str, limit: int = 128) -> str:
    """A client-given id or name as it may appear in a message or a log line: quoted, at most
    `limit` characters of it, so a megabyte id cannot be echoed back or flood the logs."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _clean(value: Any) -> Any:
    # Seconds rounded to microseconds: enough precision, shorter lines.
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return str(value)  # enums, exceptions, paths: their text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then any request fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, _FIELDS_ATTR, None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Human text; request fields appended as logfmt `key=value` on the same line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, _FIELDS_ATTR, None)
        if fields:
            line += " " + " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items())
        return line


def _logfmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value if isinstance(value, str) else json.dumps(value)
    # Quote (JSON-escaped) anything with spaces, quotes, '=' or newlines, so one
    # request is always one line, whatever a prompt or error message contains.
    if text == "" or any(c in text for c in ' "=\n\r\t') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


def _parse_level(level: int | str) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.strip().upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}")
    return value


def setup_logging(
    fmt: str = "text", level: int | str = "INFO", log_prompts: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """Configures the root logger with one handler writing `fmt` ("text" or
    "json") to `stream` (stderr by default). Calling it again replaces the
    handler it installed before, not anyone else's. Returns the handler."""
    global _log_prompts
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    lvl = _parse_level(level)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    formatter.converter = time.gmtime  # timestamps are UTC, hence the "Z"
    handler.setFormatter(formatter)
    handler.set_name("loramux")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "loramux"]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(lvl)
    _log_prompts = bool(log_prompts)
    _route_library_output()
    return handler


def _route_library_output() -> None:
    """A server's stderr is its log stream, one record per line. Hugging Face's
    progress bars and transformers' own stderr handler would put lines of their
    own there (and break JSON logs), so bars are off and transformers' records
    and Python warnings go through our handler instead."""
    logging.captureWarnings(True)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers is a dependency; a library user may still lack it
        return
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def prompts_logged() -> bool:
    """Whether request lines carry the prompt text (`--log-prompts`). Callers
    check it before decoding a prompt, so the default costs nothing."""
    return _log_prompts


def request_fields(record: dict[str, Any], log_prompts: bool | None = None) -> dict[str, Any]:
    """The fields that `log_request` writes: the known ones first (missing ones as
    null), then extras; user content dropped unless prompts are logged."""
    keep_content = _log_prompts if log_prompts is None else log_prompts
    fields = {k: _clean(record.get(k)) for k in REQUEST_FIELDS}
    for k, v in record.items():
        if k in fields or (k in CONTENT_FIELDS and not keep_content):
            continue
        fields[k] = _clean(v)
    return fields


def log_request(record: dict[str, Any]) -> None:
    """Writes one line for a finished request on the `loramux.request` logger:
    request_id, adapter_id, status, finish_reason, prompt_tokens,
    generated_tokens, queue_s, ttft_s, total_s (and any extra keys). The prompt
    and generated text are left out unless setup_logging(log_prompts=True)."""
    # Always INFO, whatever the status: one line per request at one level, so
    # filtering by level never hides some requests and keeps others. Failures
    # are logged (with traceback) where they happen, under the same request_id.
    if _request_log.isEnabledFor(logging.INFO):
        _request_log.info("request finished", extra={_FIELDS_ATTR: request_fields(record)})
