"""The pieces of attention that do not care how the KV cache is laid out.

They take positions, not cache rows, so the same mask builder and the same score
function serve a per-row cache and a paged one (where keys are gathered through a
block table and their positions come with them).

What transformers' attention interface can ask for, per layer (as keyword
arguments of the attention call), and what it means, as transformers' eager
attention and mask builders define it:

- `scaling` s: scores = s · q·kᵀ (default 1/√d).
- `sliding_window` W: query at position i sees key j iff i - W < j ≤ i
  (masking_utils' `sliding_window_overlay`: `kv_idx > q_idx - W`), so exactly
  the last W positions, itself included. None: every j ≤ i.
- `softcap` c (Gemma 2's `attn_logit_softcapping`): scores ← c · tanh(scores / c),
  after scaling and before the mask.
- `s_aux` (attention sinks, one logit per head, GPT-OSS): softmax over the row's
  scores and the sink logit together; the sink's share of the probability is
  dropped (it attends to nothing), so the row's weights sum to less than one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Keyword arguments the attention interface may pass that do not change the result here:
# the model-level ones transformers threads through every layer, and the ones loramux replaces.
IGNORED_KWARGS = frozenset(
    {"position_ids", "cache_position", "use_cache", "output_attentions", "past_key_values", "cache",
     "past_key_value", "position_embeddings", "is_causal", "layer_idx", "head_mask", "output_router_logits"}
)  # fmt: skip
HANDLED_KWARGS = frozenset({"sliding_window", "softcap", "s_aux"})


def unsupported_kwargs(kwargs: dict[str, object]) -> list[str]:
    """Names of attention arguments that would change the result and that this attention does not implement."""
    return sorted(k for k, v in kwargs.items() if k not in IGNORED_KWARGS | HANDLED_KWARGS and v is not None)


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query may attend to: causal, and within the sliding window if there is one.

    q_pos: [..., n] query positions; k_pos: [..., L] key positions (broadcastable batch dims).
    Returns bool [..., n, L]: k ≤ q and (window is None or q - k < window).
    """
    q = q_pos.unsqueeze(-1)  # [..., n, 1]
    k = k_pos.unsqueeze(-2)  # [..., 1, L]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    return mask


def decode_mask(lengths: torch.Tensor, keys: int, window: int | None) -> torch.Tensor:
    """The mask of one decode token per row, at position lengths-1, over key positions 0..keys-1.

    lengths: [B] tokens in each row's cache, the new one included. Returns bool [B, 1, 1, keys]:
    key j < length and, with a window, j > length - 1 - window.
    """
    k_pos = torch.arange(keys, device=lengths.device)
    return visible((lengths - 1)[:, None], k_pos, window)[:, None]  # [B, 1, 1, keys]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """softmax(s·q·kᵀ, capped, masked, with sinks) · v, for GQA too.

    q: [B, heads, n, d]; k, v: [B, kv_heads, L, d]; mask: bool broadcastable to [B, heads, n, L]
    (True = may attend) or None; causal: the mask is the plain lower triangle (n == L).
    sinks: [heads] or None. Returns [B, heads, n, d].

    Without soft-capping and sinks this is one scaled_dot_product_attention call (any fused
    kernel it picks). With them, the pure-torch form of transformers' eager attention: scores
    in the query dtype, softmax in float32.
    """
    gqa = q.shape[1] != k.shape[1]
    if softcap is None and sinks is None:
        b, heads, n, d = q.shape
        if gqa and n == 1 and not causal and (mask is None or mask.shape[-3:-1] == (1, 1)):
            # One query per row (decode): the g = heads / kv_heads query heads of a KV head are g
            # queries of that head (heads j·g .. j·g+g-1 share KV head j, as repeat_kv orders them),
            # so the kernel reads each K/V once, without the GQA broadcast (~10% faster on CPU).
            kv = k.shape[1]
            qg = q.reshape(b, kv, heads // kv, d)  # [B, kv_heads, g, d]
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [B, kv_heads, g, d]
            return out.reshape(b, heads, 1, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, heads, L, d]
    s = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * s  # [B, heads, n, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if causal:
        n, length = scores.shape[-2:]
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if sinks is not None:
        sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)  # [B, heads, n, 1]
        scores = torch.cat([scores, sink], dim=-1)
        scores = scores - scores.amax(dim=-1, keepdim=True)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)[..., :-1]
    else:
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
    return torch.matmul(probs.to(v.dtype), v)
