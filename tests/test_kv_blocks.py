"""The block pool and the prefix hash chain on their own (no model)."""

from __future__ import annotations

import pytest

from loramux.adapters.cache.slot import Lease
from loramux.engine.kv_blocks import BlockPool
from loramux.engine.prefix_cache import PrefixCache, identity_of, position_tokens
from loramux.engine.request import Request, SamplingParams


def _req(tokens: list[int], adapter: str = "", sha: str = "", virtual: int = 0) -> Request:
    r = Request("r", list(tokens), SamplingParams())
    if adapter:
        r.adapter_id = adapter
        r.adapter_handle = Lease(slot=0, key=(adapter, sha))
        r.num_virtual = virtual
    return r


def _fill(cache: PrefixCache, r: Request) -> None:
    """Give `r` blocks for its whole sequence, as if a forward computed it, and address them."""
    pool = cache.pool
    r.block_table = r.block_table or []
    while pool.block_size * len(r.block_table) < r.seq_len:
        r.block_table.append(pool.allocate())
    before, r.num_computed = r.num_computed, r.seq_len
    cache.commit(r, before)


def test_blocks_are_counted_held_cached_free():
    pool = BlockPool(4, 2)
    a, b = pool.allocate(), pool.allocate()
    assert (pool.num_used, pool.num_free, pool.num_cached) == (2, 2, 0)
    pool.commit(a, b"h-a")
    pool.release([a, b])
    assert (pool.num_used, pool.num_free, pool.num_cached) == (0, 4, 1)  # a stays cached, b is free
    assert pool.lookup(b"h-a") == a and pool.num_used == 1 and pool.num_cached == 0
    assert pool.lookup(b"h-a") == a and pool.refs[a] == 2  # shared by two requests
    pool.release([a])
    assert pool.num_used == 1  # still held by the other
    with pytest.raises(ValueError):
        BlockPool(0, 16)


def test_unreferenced_cached_blocks_are_evicted_least_recently_used_first():
    pool = BlockPool(3, 2)
    blocks = [pool.allocate() for _ in range(3)]
    for i, blk in enumerate(blocks):
        pool.commit(blk, f"h{i}".encode())
    pool.release([blocks[0]])
    pool.release([blocks[2], blocks[1]])  # a table is released tail first: its head 2 is the more recent
    assert pool.lookup(b"h0") == blocks[0]  # a hit makes 0 held again, then the most recent
    pool.release([blocks[0]])
    order = [pool.allocate() for _ in range(3)]
    assert order == [blocks[1], blocks[2], blocks[0]]
    assert pool.lookup(b"h1") is None and not pool.by_hash  # evicted blocks lose their address
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate()


def test_a_request_reuses_its_longest_cached_chain_but_computes_its_last_position():
    cache = PrefixCache(BlockPool(16, 4))
    first = _req(list(range(10)))  # blocks [0..3] [4..7] full, [8, 9] partial
    _fill(cache, first)
    assert cache.pool.num_cached == 0 and len(cache.pool.by_hash) == 2
    same_start = _req(list(range(8)) + [99, 98, 97])
    assert cache.match(same_start) == first.block_table[:2]
    exact = _req(list(range(8)))  # 8 tokens: the last one is computed, so only block 0 is reused
    assert cache.match(exact) == first.block_table[:1]
    diverges = _req([0, 1, 2, 3, 4, 5, 6, 70, 8, 9])
    assert cache.match(diverges) == first.block_table[:1]
    assert cache.match(_req([1, 0, 2, 3, 4, 5, 6, 7, 8])) == []
    off = PrefixCache(cache.pool, enabled=False)
    assert off.match(_req(list(range(10)))) == []


def test_chains_never_cross_adapters_or_uploads_of_one_id():
    cache = PrefixCache(BlockPool(32, 4))
    prompt = list(range(12))
    owners = [_req(prompt), _req(prompt, "a", "sha-1"), _req(prompt, "b", "sha-1"), _req(prompt, "a", "sha-2")]
    for r in owners:
        assert cache.match(r) == []  # nobody's blocks match anyone else's
        _fill(cache, r)
    for r in owners:  # each one finds exactly its own
        again = _req(prompt, *(r.adapter_handle.key if r.adapter_handle else ()))
        assert cache.match(again) == r.block_table[:2]
    assert len({id_ for r in owners for id_ in [identity_of(r)]}) == 4


def test_soft_prompt_positions_enter_the_chain():
    r = _req([7, 8, 9], "p", "sha", virtual=3)
    assert position_tokens(r, 0, 6) == [-1, -2, -3, 7, 8, 9]
    assert position_tokens(r, 2, 5) == [-3, 7, 8]
    cache = PrefixCache(BlockPool(8, 2))
    _fill(cache, r)
    assert cache.match(_req([7, 8, 9], "p", "sha", virtual=3)) == r.block_table[:2]
    assert cache.match(_req([7, 8, 9], "p", "sha", virtual=2)) == []  # another soft prompt length: another root
