"""Flat-batch attention over the paged KV cache, registered with transformers' attention interface.

The model runs on one flat row of tokens, `input_ids: [1, T]`, mixing prefill chunks
of some sequences with one decode token of others. Projections and MLPs are per
token, so only attention needs to know which tokens belong to which sequence: this
function writes each token's K/V into its slot of the block pool and attends over
that sequence's blocks alone (paged_attention.py). Its `AttentionMeta` is part of the
one per-forward context (forward_context.py) that the runner sets on the holder;
every attention module holds a reference to that holder (`attach`), so nothing is
threaded through `forward`: decoder layers that do not pass their keyword arguments
on (StableLM's) are served the same.

The masks and the score function are in attention_math.py (positions in, no cache
layout); sliding windows, soft-capping and sinks are the attention call's own
arguments, so each layer gets its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface

from loramux.engine.attention_math import attend, decode_mask, unsupported_kwargs, visible
from loramux.engine.kv_blocks import BlockPool
from loramux.engine.paged_attention import TorchPagedAttention

ATTN_IMPL = "loramux_flat"
HOLDER_ATTR = "loramux_attention_holder"


@dataclass(frozen=True)
class PrefillSeq:
    start: int  # first token of this chunk in the flat batch
    length: int  # new tokens of this sequence in this forward
    context: int  # positions already in its blocks (0 for the first chunk of a fresh prompt)
    table: torch.Tensor  # [nb] its block table, covering context + length positions


@dataclass
class AttentionMeta:
    """Everything attention needs for one forward, built once by the runner."""

    pool: BlockPool
    kernel: TorchPagedAttention
    # slots: [T] where every token's K/V goes: block * block_size + offset
    slots: torch.Tensor
    # single-token queries: dec_tokens [B] flat indices, dec_tables [B, nb] block tables (padded),
    # dec_lengths [B] positions in each one's blocks, the new one included
    dec_tokens: torch.Tensor | None
    dec_tables: torch.Tensor | None
    dec_lengths: torch.Tensor | None
    prefills: list[PrefillSeq]
    # the layers whose attention ran in this forward (the self-check's proof that none bypassed it)
    layers: set[int] = field(default_factory=set)
    # sliding window (None = full) -> decode mask [B, 1, 1, nb * block_size], built by the first layer that needs it
    _dec_masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """bool [B, 1, 1, nb * block_size]: key j visible to the row's decode token (padding never is)."""
        mask = self._dec_masks.get(window)
        if mask is None:
            keys = self.dec_tables.shape[1] * self.pool.block_size
            mask = self._dec_masks[window] = decode_mask(self.dec_lengths, keys, window)
        return mask


def meta_of(module: nn.Module) -> AttentionMeta:
    """This forward's metadata, from the context holder the runner attached to every attention module."""
    holder = getattr(module, HOLDER_ATTR, None)
    ctx = holder.get() if holder is not None else None
    meta = getattr(ctx, "attention", None)
    if not isinstance(meta, AttentionMeta):
        raise RuntimeError("loramux attention called without its per-forward metadata")
    return meta


def flat_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Write the new K/V into their slots, attend per sequence; [1, T, heads, d] as the interface returns it.

    The per-layer features (window, soft-cap, sinks) are the attention call's own arguments, so
    each layer gets its own (Gemma 3's local and global layers, Qwen2's first sliding layers).
    """
    # query: [1, heads, T, d]; key, value: [1, kv_heads, T, d]
    meta = meta_of(module)
    other = unsupported_kwargs(kwargs)
    if other:
        raise RuntimeError(f"{type(module).__name__} asks for attention features loramux does not implement: {other}")
    if dropout:
        raise RuntimeError("attention dropout is on: the model is in training mode")
    meta.layers.add(module.layer_idx)
    window = int(sliding_window) if sliding_window else None
    feats = dict(scale=scaling, softcap=softcap, sinks=s_aux)
    k_cache, v_cache = meta.pool.layer(module.layer_idx, key)  # [N, bs, kv_heads, d]
    kv_heads, d = k_cache.shape[2], k_cache.shape[3]
    # Scatter the new K/V into their slots: [T, kv_heads, d] into the flat [N * bs, kv_heads, d] view.
    k_cache.view(-1, kv_heads, d)[meta.slots] = key[0].transpose(0, 1)
    v_cache.view(-1, kv_heads, d)[meta.slots] = value[0].transpose(0, 1)

    q = query[0]  # [heads, T, d]
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)  # [T, heads, d]

    if meta.dec_tokens is not None:
        qd = q[:, meta.dec_tokens].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, d]
        od = meta.kernel.decode(qd, k_cache, v_cache, meta.dec_tables, meta.decode_mask(window), **feats)
        out[meta.dec_tokens] = od.squeeze(2)

    for p in meta.prefills:
        qp = q[:, p.start : p.start + p.length].unsqueeze(0)  # [1, heads, n, d]
        if p.context == 0:  # a whole new sequence: its keys are all in this forward
            kp = key[:, :, p.start : p.start + p.length]
            vp = value[:, :, p.start : p.start + p.length]
            if window is None:
                op = attend(qp, kp, vp, None, causal=True, **feats)
            else:
                pos = torch.arange(p.length, device=q.device)
                op = attend(qp, kp, vp, visible(pos, pos, window), **feats)
        else:
            op = meta.kernel.prefill(qp, k_cache, v_cache, p.table, p.context, window, **feats)
        out[p.start : p.start + p.length] = op[0].transpose(0, 1)
    return out.unsqueeze(0), None


def attach(model: nn.Module, holder: object) -> int:
    """Give every module of `model` with a `layer_idx` (attention modules, some decoder layers) the holder.

    Attention then reads its metadata from the holder, whatever the decoder layers pass on.
    Returns how many modules got it.
    """
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "layer_idx", None), int):
            setattr(m, HOLDER_ATTR, holder)
            n += 1
    return n


def register() -> None:
    """Make `ATTN_IMPL` a name transformers models can be switched to (idempotent)."""
    AttentionInterface.register(ATTN_IMPL, flat_attention)
