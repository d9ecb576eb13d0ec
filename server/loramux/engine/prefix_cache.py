"""Prefix caching: full KV blocks addressed by a hash chain, reused by requests with the same chain.

The key/value of a position depend on everything that decides the hidden states up
to it: the weights that computed them and every earlier input. So block `i` of a
request is addressed by

    h_root = sha256("loramux-kv" | adapter id | weights sha256 | soft prompt length)   (or "base")
    h_i    = sha256(h_{i-1} | the block's token ids)

A soft prompt's virtual positions enter the chain as the ids -1, -2, ... (their
content is fixed by the weights sha256 in the root). Two requests share block `i`
only when their roots and every token up to the end of block `i` are equal: never
across adapters, and never across two uploads of one id (their sha256 differ), so an
overwrite can never serve KV computed with the old weights.

A request reuses its longest run of cached blocks from the start, but always
computes at least its last position (its logits give the next token).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from loramux.engine.kv_blocks import BlockPool
from loramux.engine.request import Request

BASE_IDENTITY = ("base",)


def root_hash(identity: Sequence[object]) -> bytes:
    """The chain's start for one adapter identity: ("base",) or (adapter_id, sha256, num_virtual)."""
    h = hashlib.sha256(b"loramux-kv")
    for part in identity:
        data = str(part).encode()
        h.update(struct.pack("<I", len(data)) + data)
    return h.digest()


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """h_i = sha256(h_{i-1} | tokens), tokens as signed 64-bit ints."""
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


def identity_of(r: Request) -> tuple[object, ...]:
    """What decides a request's KV besides its tokens: its adapter's id and weights, its soft prompt."""
    if not r.adapter_id:
        return BASE_IDENTITY
    key = getattr(r.adapter_handle, "key", None)  # the lease's (adapter_id, weights sha256)
    if key is None:
        raise RuntimeError(f"request {r.request_id}: prefix hashing needs its adapter lease")
    return ("adapter", key[0], key[1], r.num_virtual)


def position_tokens(r: Request, start: int, end: int) -> list[int]:
    """The ids at sequence positions [start, end): -1-p for a virtual position p, else the token."""
    nv = r.num_virtual
    out = [-1 - p for p in range(start, min(end, nv))]
    if end > nv:
        out.extend(r.ids_from(max(start - nv, 0))[: end - max(start, nv)])
    return out


class PrefixCache:
    """The hash chains of running requests over one block pool."""

    def __init__(self, pool: BlockPool, enabled: bool = True) -> None:
        self.pool = pool
        self.enabled = enabled

    def _hash(self, r: Request, index: int) -> bytes:
        """Block `index`'s hash, extending the request's chain as far as needed."""
        bs = self.pool.block_size
        if not r.block_hashes:
            r.block_hashes.append(root_hash(identity_of(r)))  # [0] is the root; block i's hash is [i + 1]
        while len(r.block_hashes) <= index + 1:
            i = len(r.block_hashes) - 1
            r.block_hashes.append(chain_hash(r.block_hashes[-1], position_tokens(r, i * bs, (i + 1) * bs)))
        return r.block_hashes[index + 1]

    def match(self, r: Request) -> list[int]:
        """Held blocks of the longest cached chain of `r` (leaving at least its last position to compute)."""
        if not self.enabled:
            return []
        blocks: list[int] = []
        for i in range((r.seq_len - 1) // self.pool.block_size):
            block = self.pool.lookup(self._hash(r, i))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def commit(self, r: Request, before: int) -> None:
        """Address the blocks that the last forward filled (positions `before` .. `r.num_computed`)."""
        if not self.enabled:
            return
        bs = self.pool.block_size
        for i in range(before // bs, r.num_computed // bs):
            self.pool.commit(r.block_table[i], self._hash(r, i))
