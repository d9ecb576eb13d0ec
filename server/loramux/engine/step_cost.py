"""The step budget's cost model: what a prompt chunk costs a step, counted in tokens that see nothing.

A forward's time is mostly its matrix products, and on the pure-torch paged path also
the gather of a sequence's K/V out of its blocks. Per decoder layer, with P the layer's
2-D weights, H heads and H_kv K/V heads of width d:
- a token's projections and MLP cost P multiply-adds: one token;
- a token that sees j keys adds 2·H·d·j (q·kᵀ and p·V): j / K tokens, K = P / (2·H·d) / α;
- a chunk after c computed positions gathers them once per layer, 2·H_kv·d elements per
  position: c / G tokens, G = P / (2·H_kv·d) / γ.
α (how many projection multiply-adds one attention multiply-add costs in time) and γ (the
same for one gathered element) belong to the device and its attention path; they are
measured with scripts/profile_chunk_cost.py (the README's *Chunked prefill* has the
figures). So n new tokens after c computed positions cost

    cost(c, n) = n + n·(c + (n + 1) / 2) / K + c / G

tokens. The scheduler fills `--max-batch-tokens` with these costs instead of plain token
counts: each decode counts one token, the prompt chunks get the rest at their cost, so a
chunk deep into a long prompt gets fewer tokens than its first chunk, and every step that
carries a chunk costs about the same as the decodes plus `--max-batch-tokens` - decodes
tokens at no context (the decoding streams beside it keep an even pace). A decode's own
attention grows with its sequence too, but is not charged: it runs whatever the budget,
and once the decodes alone cost more than the budget, charging it would only shrink every
chunk to the one-block minimum (measured: the README). The embedding lookup and the LM
head (one row per request) are left out; sliding-window layers see at most their window,
the model counts every key (a smaller chunk, never a slower step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# (α, γ) per device type for the pure-torch attention path (engine/paged_attention.py), measured
# with scripts/profile_chunk_cost.py on the bench's CPU model (--threads 1: α 1.00, γ 72; the
# README's Chunked prefill). CUDA: not measured here (no GPU): plain multiply-add counts, no gather.
DEVICE_FACTORS: dict[str, tuple[float, float]] = {"cpu": (1.0, 72.0)}


def shape_of(model: torch.nn.Module) -> tuple[float, int, int, int]:
    """(P: 2-D weights per decoder layer, H heads, H_kv K/V heads, d head width) of a transformers causal LM."""
    cfg = model.config.get_text_config()
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    skip = {id(model.get_input_embeddings().weight)}
    out = model.get_output_embeddings()
    if out is not None:
        skip.add(id(out.weight))
    weights = sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in skip)
    return weights / int(cfg.num_hidden_layers), heads, kv_heads, head_dim


def forward_macs(model: torch.nn.Module) -> int:
    """P: one row's multiply-accumulates through the model (merge_policy.choose_mode; the ranks bench's FLOP
    ceiling): every 2-D weight once, the input embedding table left out (a lookup) unless the LM head shares it."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    return sum(p.numel() for p in model.parameters() if p.dim() == 2 and (p is not embed or tied))


@dataclass(frozen=True)
class StepCost:
    # K: keys at which a token's attention costs as much as its projections (inf: attention is free)
    keys_per_token: float = math.inf
    # G: context positions whose gather costs as much as one token's projections (inf: no gather)
    positions_per_token: float = math.inf

    def __post_init__(self) -> None:
        if not (self.keys_per_token > 0 and self.positions_per_token > 0):
            raise ValueError(f"K and G must be > 0, got {self.keys_per_token}, {self.positions_per_token}")

    @classmethod
    def of_model(cls, model: torch.nn.Module, device_type: str) -> StepCost:
        """K = P / (2·H·d) / α and G = P / (2·H_kv·d) / γ of a model on a device (`DEVICE_FACTORS`)."""
        weights, heads, kv_heads, d = shape_of(model)
        alpha, gamma = DEVICE_FACTORS.get(device_type, (1.0, 0.0))
        gather = weights / (2 * kv_heads * d) / gamma if gamma else math.inf
        return cls(weights / (2 * heads * d) / alpha, gather)

    def chunk(self, context: int, n: int) -> float:
        """n new tokens after `context` computed positions: n + n·(context + (n + 1) / 2) / K + context / G."""
        return n + n * (context + (n + 1) / 2) / self.keys_per_token + context / self.positions_per_token

    def tokens_within(self, context: int, budget: float) -> int:
        """The most tokens a chunk after `context` positions may take with `chunk(context, n) <= budget`.

        chunk is n²/(2K) + n·b + context/G with b = 1 + (context + 1/2)/K, so with
        B = budget - context/G: n = K·(√(b² + 2B/K) − b) = 2B / (b + √(b² + 2B/K)) (the form
        that stays exact for a large K), rounded down (and corrected by one for floating point).
        """
        k, g = self.keys_per_token, self.positions_per_token
        left = budget - context / g
        if left < 1:
            return 0
        b = 1.0 + (context + 0.5) / k
        n = int(2.0 * left / (b + math.sqrt(b * b + 2.0 * left / k)))
        while self.chunk(context, n + 1) <= budget:
            n += 1
        while n > 0 and self.chunk(context, n) > budget:
            n -= 1
        return n
