"""The KV cache as a pool of fixed-size blocks, shared by every layer's key and value buffers.

Every layer has a key and a value buffer `[num_blocks, block_size, kv_heads, head_dim]`;
block `b` of a request is the same index in every layer. A running request holds a
block table (`Request.block_table`): its position `p` lives in block
`table[p // block_size]` at offset `p % block_size`, so it holds only the blocks its
tokens fill, never a whole `--max-model-len` row.

A block is in one of three states:
- held: `refs > 0`, in the block table of at least one running request;
- cached: `refs == 0` but full and addressed by its prefix hash (prefix_cache.py), so a
  later request with the same chain reuses it; these are evicted least recently used first;
- free: `refs == 0`, no hash.
`num_free` counts free + cached, since a cached block is evicted the moment it is needed.
Buffers are allocated at the first forward from the shapes attention actually produces.

Every slot of every buffer holds a finite value: the buffers start zeroed, and a block
handed out again is zeroed before the next forward writes into it (`take_dirty`, which
the runner flushes with its one index copy). Attention then needs no masking of the
gathered K/V: a masked slot's probability is exactly 0, and 0 · (a finite value) = 0,
where the stale NaN of a request whose forward overflowed would have poisoned the row.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV block pool needs num_blocks, block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.refs = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 first
        self._cached: OrderedDict[int, None] = OrderedDict()  # refs == 0 and hashed, oldest first
        self._used = [False] * num_blocks  # handed out at least once since the buffers were zeroed
        self._dirty: list[int] = []  # handed out again, not yet zeroed

    # --- counts ---
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (free ones, then cached ones evicted LRU)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Idle blocks that hold a reusable prefix."""
        return len(self._cached)

    @property
    def num_used(self) -> int:
        """Blocks held by running requests."""
        return self.num_blocks - self.num_free

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # --- allocation ---
    def allocate(self) -> int:
        """One block for a request's new tokens; evicts the least recently used cached block if none is free."""
        if self._free:
            block = self._free.pop()
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            del self.by_hash[self.block_hash[block]]
            self.block_hash[block] = None
        else:
            raise RuntimeError("the KV block pool is exhausted")
        self.refs[block] = 1
        if self._used[block]:
            self._dirty.append(block)
        self._used[block] = True
        return block

    def take_dirty(self) -> list[int]:
        """Blocks handed out again since the last call: the runner zeroes them (`zero`) before its forward."""
        dirty, self._dirty = self._dirty, []
        return dirty

    def zero(self, blocks: torch.Tensor) -> None:
        """Zero `blocks` [n] (int64, on the buffers' device) in every layer's keys and values."""
        for t in (*self.keys.values(), *self.values.values()):
            t.index_fill_(0, blocks, 0)

    def release(self, blocks: list[int]) -> None:
        """Drop a request's hold on its blocks, last block first.

        Its tail blocks then come first in the LRU order, so eviction takes a chain
        from its end and the shared beginning of a prompt stays cached longest.
        """
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] > 0:
                continue
            if self.block_hash[block] is not None:
                self._cached[block] = None
            else:
                self._free.append(block)

    # --- prefix cache ---
    def lookup(self, block_hash: bytes) -> int | None:
        """The block that holds `block_hash`, now held once more by the caller (None: not cached)."""
        block = self.by_hash.get(block_hash)
        if block is None:
            return None
        if self.refs[block] == 0:
            del self._cached[block]
        self.refs[block] += 1
        return block

    def commit(self, block: int, block_hash: bytes) -> None:
        """Address a block that has just been filled by its hash, so later requests can reuse it.

        When another block already holds the same hash (two equal prompts prefilled in one
        step), this one stays unaddressed and becomes free when its request ends.
        """
        if self.block_hash[block] is not None or block_hash in self.by_hash:
            return
        self.block_hash[block] = block_hash
        self.by_hash[block_hash] = block

    def clear_cache(self) -> None:
        """Forget every idle cached block (they become free)."""
        for block in list(self._cached):
            del self.by_hash[self.block_hash[block]]
            self.block_hash[block] = None
            self._free.append(block)
        self._cached.clear()

    # --- tensors ---
    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (keys, values), allocated on first use from `like`: [1, kv_heads, T, head_dim].

        Each is [num_blocks, block_size, kv_heads, head_dim].
        """
        k = self.keys.get(layer_idx)
        if k is None:
            _, kv_heads, _, head_dim = like.shape
            shape = (self.num_blocks, self.block_size, kv_heads, head_dim)
            k = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.keys[layer_idx] = k
            self.values[layer_idx] = torch.zeros_like(k)
        return k, self.values[layer_idx]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))
