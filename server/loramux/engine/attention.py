"""Flat-batch attention over the KV cache, registered with transformers' attention interface.

The model runs on one flat row of tokens, `input_ids: [1, T]`, mixing the prefill
tokens of new sequences with one decode token per running sequence. Projections
and MLPs are per token, so only attention needs to know which tokens belong to
which sequence: this function writes each token's K/V into its sequence's cache
row and attends over that row alone. transformers passes the `AttentionMeta` it
is called with (a model-forward kwarg) through to here untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from loramux.engine.kv_cache import KVCache

ATTN_IMPL = "loramux_flat"
META_KWARG = "loramux_meta"


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
    # dec_mask: True where a key position is valid; L = longest context among them. Either
    # [B, 1, 1, L] (gathered: one row per decode token) or, when the decode rows are packed
    # near row 0, [R, 1, 1, L] over cache rows 0..R-1 (dense: rows without a decode token
    # see every key, so no row is all-masked, and their output is discarded)
    dec_mask: torch.Tensor | None
    prefills: list[PrefillSeq]
    dec_dense: bool = False


def flat_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    # query: [1, heads, T, d]; key, value: [1, kv_heads, T, d]
    meta = kwargs.get(META_KWARG)
    if not isinstance(meta, AttentionMeta):
        raise RuntimeError("loramux attention called without its per-forward metadata")
    k_cache, v_cache = meta.cache.layer(module.layer_idx, key)
    # Scatter the new K/V: advanced indices (rows, positions) around a slice give [T, kv_heads, d].
    k_cache[meta.write_rows, :, meta.write_pos] = key[0].transpose(0, 1)
    v_cache[meta.write_rows, :, meta.write_pos] = value[0].transpose(0, 1)

    q = query[0]  # [heads, T, d]
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)  # [T, heads, d]
    gqa = q.shape[0] != key.shape[1]

    if meta.dec_tokens is not None:
        length = meta.dec_mask.shape[-1]
        qd = q[:, meta.dec_tokens].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, d]
        if meta.dec_dense:
            # Rows 0..R-1 of the cache as views: no copy of anyone's K/V (a gather copies them all).
            rows = meta.dec_mask.shape[0]
            qr = qd.new_zeros(rows, *qd.shape[1:])  # [R, heads, 1, d]
            qr[meta.dec_rows] = qd
            kd, vd = k_cache[:rows, :, :length], v_cache[:rows, :, :length]  # [R, kv_heads, L, d]
            od = F.scaled_dot_product_attention(qr, kd, vd, attn_mask=meta.dec_mask, scale=scaling, enable_gqa=gqa)
            od = od[meta.dec_rows]
        else:
            kd = k_cache[meta.dec_rows, :, :length]  # [B, kv_heads, L, d]
            vd = v_cache[meta.dec_rows, :, :length]
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.dec_mask, scale=scaling, enable_gqa=gqa)
        out[meta.dec_tokens] = od.squeeze(2)

    for p in meta.prefills:
        qp = q[:, p.start : p.start + p.length].unsqueeze(0)  # [1, heads, n, d]
        if p.context == 0:
            kp = key[:, :, p.start : p.start + p.length]
            vp = value[:, :, p.start : p.start + p.length]
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            total = p.context + p.length
            kp = k_cache[p.kv_row : p.kv_row + 1, :, :total]
            vp = v_cache[p.kv_row : p.kv_row + 1, :, :total]
            # query i sits at position context + i and sees keys 0 .. context + i
            qpos = torch.arange(p.context, total, device=q.device)[:, None]
            mask = torch.arange(total, device=q.device)[None, :] <= qpos  # [n, total]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[p.start : p.start + p.length] = op[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> None:
    """Make `ATTN_IMPL` a name transformers models can be switched to (idempotent)."""
    AttentionInterface.register(ATTN_IMPL, flat_attention)
