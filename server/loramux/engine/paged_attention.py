"""Attention over KV blocks: the pure-torch path, and the interface a fused kernel plugs into.

K/V of a layer live in `[num_blocks, block_size, kv_heads, d]` buffers (kv_blocks.py);
a sequence's positions `0..L-1` are the rows of its block table's blocks, in order.
The pure-torch path gathers those blocks into one `[kv_heads, L, d]` view per
sequence and runs `attend` (attention_math.py: scaling, soft-capping, sinks) with a mask:

    out_i = softmax(scale · q_i Kᵀ + mask_i) V,   mask_ij = 0 if key j is visible to query i else -inf

(decode: j < L; a prefill chunk at positions c..c+n-1: j <= c + i; with a sliding window W
also j > i - W). The gather copies
each sequence's K/V once per layer; a fused paged kernel reads the blocks in place.

A fused kernel (for instance a CUDA paged-attention kernel from an installed kernel
package) is another class with the same two methods, returned by `kernel_for` for its
device; the runner picks one per engine and puts it in the per-forward metadata. None
ships yet: this CPU-built tree has no kernel package to test one against.
"""

from __future__ import annotations

import torch

from loramux.engine.attention_math import attend, visible


def gather_blocks(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """cache: [N, bs, kv_heads, d]; tables: [B, nb] -> [B, kv_heads, nb * bs, d]."""
    b, nb = tables.shape
    blocks = cache.index_select(0, tables.reshape(-1))  # [B * nb, bs, kv_heads, d]: one copy
    return blocks.view(b, nb * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


class TorchPagedAttention:
    """The reference path: gather the blocks, then `attend` (attention_math.py) with a length or causal mask."""

    name = "torch"

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        tables: torch.Tensor,
        mask: torch.Tensor,
        scale: float | None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One query per sequence. q: [B, heads, 1, d]; tables: [B, nb]; mask: [B, 1, 1, nb * bs].

        Returns [B, heads, 1, d].
        """
        # Slots past a row's length (the rest of its last block, the padding of its table) are
        # masked; they hold finite values (kv_blocks.py zeroes a block handed out again), so a
        # masked slot adds exactly 0 · v = 0 and the gathered copy needs no masking of its own.
        k = gather_blocks(k_cache, tables)  # [B, kv_heads, L, d], copies
        v = gather_blocks(v_cache, tables)
        return attend(q, k, v, mask, scale, softcap, sinks)

    def prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        table: torch.Tensor,
        context: int,
        window: int | None,
        scale: float | None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A chunk of n queries at positions context..context+n-1. q: [1, heads, n, d]; table: [nb].

        Returns [1, heads, n, d].
        """
        n = q.shape[2]
        total = context + n
        k = gather_blocks(k_cache, table[None])[:, :, :total]  # [1, kv_heads, total, d]
        v = gather_blocks(v_cache, table[None])[:, :, :total]
        # query i sits at position context + i and sees keys 0 .. context + i (within the window)
        mask = visible(torch.arange(context, total, device=q.device), torch.arange(total, device=q.device), window)
        return attend(q, k, v, mask, scale, softcap, sinks)  # mask: [n, total]


def kernel_for(device: torch.device) -> TorchPagedAttention:
    """The paged-attention implementation for `device` (the pure-torch one on every device for now)."""
    return TorchPagedAttention()
