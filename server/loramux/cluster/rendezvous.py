"""Rendezvous (highest-random-weight) hashing: which replicas an adapter's requests prefer.

For a key k (the adapter id) and replicas r₁..rₙ, every replica gets the weight
w(k, r) = H(k ‖ r), a 64-bit hash; the replicas in decreasing weight are k's
preference order. Two properties make it the right tool for adapter affinity:

* every router computes the same order from the same replica set, with no shared
  state (the front of a cluster may have several processes);
* when a replica leaves, only the keys whose first choice it was move (each to its
  own second choice, spread evenly), and a new replica takes from every other one
  only the keys for which it now has the highest weight: ~1/n of them. A key's
  adapter is therefore loaded again only where the change forces it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(key: str, node: str) -> int:
    """H(key ‖ node): the first 8 bytes of blake2b, as an unsigned integer."""
    digest = hashlib.blake2b(f"{key}\x00{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, nodes: Iterable[str]) -> list[str]:
    """`nodes` from the most to the least preferred for `key` (ties broken by name)."""
    return sorted(nodes, key=lambda n: (-weight(key, n), n))
