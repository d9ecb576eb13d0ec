"""ListAdapters page tokens: opaque to clients, checked when they come back."""

from __future__ import annotations

import base64
import binascii

from loramux.adapters.store.layout import ADAPTER_ID_RE

_TOKEN_PREFIX = "v1:"


def encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode((_TOKEN_PREFIX + last_id).encode()).decode().rstrip("=")


def decode_page_token(token: str) -> str | None:
    """The last id of the previous page ("" for the first page), or None for a token we never made."""
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    last = text[len(_TOKEN_PREFIX) :]
    if not text.startswith(_TOKEN_PREFIX) or not ADAPTER_ID_RE.fullmatch(last):
        return None
    return last
