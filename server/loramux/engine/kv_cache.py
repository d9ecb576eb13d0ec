"""The KV cache: one contiguous row per running sequence, per layer.

Each running request owns one row (`kv_slot`) of every layer's key and value
buffers, `[max_seqs, kv_heads, max_len, head_dim]`. Buffers are allocated lazily
at the first forward, from the shapes the attention layers actually produce, so
any architecture that goes through the attention interface works unchanged.
"""

from __future__ import annotations

import heapq

import torch


class KVCache:
    def __init__(self, max_seqs: int, max_len: int) -> None:
        if max_seqs < 1 or max_len < 1:
            raise ValueError("KV cache needs max_seqs >= 1 and max_len >= 1")
        self.max_seqs = max_seqs
        self.max_len = max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        # A min-heap: the lowest free row first, so running rows stay packed near row 0 and
        # decode attention can read rows [0, R) as a view instead of gathering them (attention.py).
        self._free = list(range(max_seqs))

    # --- rows ---
    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV cache has no free row")
        return heapq.heappop(self._free)

    def release(self, row: int) -> None:
        if row < 0:
            return
        # Stale K/V in a released row are never read: reads are bounded by each sequence's length.
        heapq.heappush(self._free, row)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    # --- tensors ---
    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (keys, values), allocated on first use from `like`: [1, kv_heads, T, head_dim]."""
        k = self.keys.get(layer_idx)
        if k is None:
            _, kv_heads, _, head_dim = like.shape
            shape = (self.max_seqs, kv_heads, self.max_len, head_dim)
            k = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.keys[layer_idx] = k
            self.values[layer_idx] = torch.zeros_like(k)
        return k, self.values[layer_idx]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


def kv_cache_bytes(model_config: object, max_seqs: int, max_len: int, dtype: torch.dtype) -> int:
    """What the lazily allocated buffers will take: 2 (K, V) x layers x rows x kv_heads x len x head_dim.

    Read from the model config (Llama-style and GPT-2 names), so the engine can refuse a
    configuration that cannot fit before the first forward runs out of memory.
    """
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * int(layers) * max_seqs * int(kv_heads) * max_len * int(head_dim) * itemsize


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

