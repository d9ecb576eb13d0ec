"""How many KV blocks the pool gets: `--kv-cache-mb`, or a default share of the free memory.

One block holds `block_size` positions of K and V in every layer:
`2 x layers x block_size x kv_heads x head_dim x itemsize` bytes, read from the model
config (Llama-style and GPT-2 names). The budget is checked at start, before the first
forward allocates it, so a cache that cannot fit is refused with a message, not an
out-of-memory crash mid-request.

Default (`--kv-cache-mb 0`): `DEFAULT_SHARE` of the memory free after the model is
loaded, less the merged-weights budget, but never more than `--max-running` requests
of `--max-model-len` tokens would need (the most the scheduler can ever hold at once).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("loramux.engine")

DEFAULT_SHARE = 0.5  # of the free memory after the model and the merged budget (--kv-cache-mb 0)
MAX_SHARE = 0.9  # an explicit --kv-cache-mb above this share of the free memory is refused


def kv_bytes_per_token(model_config: object, dtype: torch.dtype) -> int:
    """K and V of one position in every layer: 2 x layers x kv_heads x head_dim x itemsize."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * int(layers) * int(kv_heads) * int(head_dim) * itemsize


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def plan_num_blocks(
    model_config: object,
    dtype: torch.dtype,
    device: torch.device,
    *,
    kv_cache_mb: float,
    block_size: int,
    max_len: int,
    max_running: int,
    merged_cache_mb: float = 0.0,
) -> int:
    """The pool's block count; ValueError when the budget does not fit or cannot hold one full request."""
    per_block = kv_bytes_per_token(model_config, dtype) * block_size
    one_request = -(-max_len // block_size)  # blocks of one --max-model-len request
    free = available_bytes(device)
    if kv_cache_mb > 0:
        budget = int(kv_cache_mb * 2**20)
        if free is not None and budget > MAX_SHARE * free:
            raise ValueError(
                f"--kv-cache-mb {kv_cache_mb:g} does not fit: only {free / 2**20:.0f} MiB is free on {device} "
                f"(at most {MAX_SHARE:.0%} of it can hold the KV cache)"
            )
    else:
        cap = max_running * one_request * per_block
        budget = cap if free is None else min(cap, int(DEFAULT_SHARE * (free - merged_cache_mb * 2**20)))
    num_blocks = budget // per_block
    if num_blocks < one_request:
        raise ValueError(
            f"the KV cache ({budget / 2**20:.1f} MiB = {num_blocks} blocks of {block_size} tokens) cannot hold one "
            f"request of --max-model-len {max_len} tokens ({one_request} blocks, {one_request * per_block / 2**20:.1f}"
            f" MiB); raise --kv-cache-mb or lower --max-model-len"
        )
    log.info(
        "KV cache: %d blocks of %d tokens = %.1f MiB on %s",
        num_blocks,
        block_size,
        num_blocks * per_block / 2**20,
        device,
    )
    return int(num_blocks)
