"""Flat-batch attention over the KV cache, registered with transformers' attention interface.

The model runs on one flat row of tokens, `input_ids: [1, T]`, mixing the prefill
tokens of new sequences with one decode token per running sequence. Projections
and MLPs are per token, so only attention needs to know which tokens belong to
which sequence: this function writes each token's K/V into its sequence's cache
row and attends over that row alone. Its `AttentionMeta` is part of the one
per-forward context (forward_context.py) that the runner sets on the holder; every
attention module holds a reference to that holder (`attach`), so nothing is
threaded through `forward`: decoder layers that do not pass their keyword
arguments on (StableLM's) are served the same.

The masks and the score function are in attention_math.py (positions in, no cache
layout), so that a paged cache can use them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface

from loramux.engine.attention_math import attend, decode_mask, unsupported_kwargs, visible
from loramux.engine.kv_cache import KVCache

ATTN_IMPL = "loramux_flat"
HOLDER_ATTR = "loramux_attention_holder"


@dataclass(frozen=True)
class PrefillSeq:
    start: int  # first token of this sequence in the flat batch
    length: int  # new tokens of this sequence in this forward
    kv_row: int
    context: int  # tokens already in its cache (0 for a fresh prompt)


@dataclass
class AttentionMeta:
    """Everything attention needs for one forward, built once by the runner."""

    cache: KVCache
    # write_rows, write_pos: [T] cache row and position of every token's K/V
    write_rows: torch.Tensor
    write_pos: torch.Tensor
    # decode tokens: one per running sequence; dec_tokens: [B] flat indices, dec_rows: [B] cache rows
    dec_tokens: torch.Tensor | None
    dec_rows: torch.Tensor | None
    # dec_lengths: tokens in the cache (the new one included) of each row the decode mask covers:
    # either [B] (gathered: one row per decode token) or, when the decode rows are packed near
    # row 0, [R] over cache rows 0..R-1 (dense: rows without a decode token get the longest
    # length, so no row is all-masked, and their output is discarded)
    dec_lengths: torch.Tensor | None
    prefills: list[PrefillSeq]
    dec_dense: bool = False
    # the layers whose attention ran in this forward (the self-check's proof that none bypassed it)
    layers: set[int] = field(default_factory=set)
    # sliding window (None = full) -> decode mask [B or R, 1, 1, L], built by the first layer that needs it
    _dec_masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """bool [B or R, 1, 1, L], L = the longest length: key j visible to the row's decode token."""
        mask = self._dec_masks.get(window)
        if mask is None:
            keys = int(self.dec_lengths.max())
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
    """Write the new K/V into their rows, attend per sequence; [1, T, heads, d] as the interface returns it.

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
    k_cache, v_cache = meta.cache.layer(module.layer_idx, key)
    # Scatter the new K/V: advanced indices (rows, positions) around a slice give [T, kv_heads, d].
    k_cache[meta.write_rows, :, meta.write_pos] = key[0].transpose(0, 1)
    v_cache[meta.write_rows, :, meta.write_pos] = value[0].transpose(0, 1)

    q = query[0]  # [heads, T, d]
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)  # [T, heads, d]

    if meta.dec_tokens is not None:
        mask = meta.decode_mask(window)  # [B or R, 1, 1, L]
        length = mask.shape[-1]
        qd = q[:, meta.dec_tokens].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, d]
        if meta.dec_dense:
            # Rows 0..R-1 of the cache as views: no copy of anyone's K/V (a gather copies them all).
            rows = mask.shape[0]
            qr = qd.new_zeros(rows, *qd.shape[1:])  # [R, heads, 1, d]
            qr[meta.dec_rows] = qd
            kd, vd = k_cache[:rows, :, :length], v_cache[:rows, :, :length]  # [R, kv_heads, L, d]
            od = attend(qr, kd, vd, mask, **feats)[meta.dec_rows]
        else:
            kd = k_cache[meta.dec_rows, :, :length]  # [B, kv_heads, L, d]
            vd = v_cache[meta.dec_rows, :, :length]
            od = attend(qd, kd, vd, mask, **feats)
        out[meta.dec_tokens] = od.squeeze(2)

    for p in meta.prefills:
        qp = q[:, p.start : p.start + p.length].unsqueeze(0)  # [1, heads, n, d]
        if p.context == 0 and window is None:
            kp = key[:, :, p.start : p.start + p.length]
            vp = value[:, :, p.start : p.start + p.length]
            op = attend(qp, kp, vp, None, causal=True, **feats)
        else:
            total = p.context + p.length
            kp = k_cache[p.kv_row : p.kv_row + 1, :, :total]
            vp = v_cache[p.kv_row : p.kv_row + 1, :, :total]
            # query i sits at position context + i and sees keys 0 .. context + i (within the window)
            qpos = torch.arange(p.context, total, device=q.device)
            mask = visible(qpos, torch.arange(total, device=q.device), window)  # [n, total]
            op = attend(qp, kp, vp, mask, **feats)
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
