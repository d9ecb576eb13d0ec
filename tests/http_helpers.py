"""A real loramux server with the OpenAI-compatible API on loopback, and the official `openai` client for it."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import openai
from harness import ServerThread
from test_metrics_unit import Scrape

API_KEY = "sk-loramux-test"
ADMIN_TOKEN = "admin-test-token"
SERVED = "tiny-chat"


def http_server(model_dir: Path, root: Path, adapters: dict[str, Path], **overrides: object) -> ServerThread:
    """A server with an API key, an admin token, `adapters` in its store and `root/allowed` for load_lora_adapter."""
    store = root / "store"
    store.mkdir()
    for name, path in adapters.items():
        shutil.copytree(path, store / name)
    (root / "key").write_text(API_KEY + "\n")
    (root / "token").write_text(ADMIN_TOKEN + "\n")
    (root / "allowed").mkdir()
    return ServerThread(
        model_dir, store=store, http_port=0, api_key_file=root / "key", admin_token_file=root / "token",
        served_model_name=SERVED, allowed_adapter_dir=root / "allowed", **overrides,
    )  # fmt: skip


def base_url(s: ServerThread) -> str:
    return f"http://127.0.0.1:{s.server.http_port}"


def client(s: ServerThread, key: str | None = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(s) + "/v1", api_key=key or "none", max_retries=0, timeout=120)


def scrape(s: ServerThread) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.server.metrics_port}/metrics", timeout=10) as resp:
        return Scrape(resp.read().decode())
