"""The cache-independent attention pieces against transformers' own definitions (masks, eager attentions)."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

from loramux.engine.attention_math import attend, decode_mask, unsupported_kwargs, visible


@pytest.mark.parametrize("window", [None, 1, 3, 7])
def test_visible_is_transformers_mask_function(window):
    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    q_pos, k_pos = torch.arange(4, 11), torch.arange(11)  # queries after 4 cached positions
    got = visible(q_pos, k_pos, window)  # [7, 11]
    want = torch.tensor([[bool(fn(0, 0, q, k)) for k in k_pos] for q in q_pos])
    assert torch.equal(got, want)
    if window is not None:
        assert (got.sum(-1) <= window).all() and (got.sum(-1) == window).any()  # the window really cuts


def test_decode_mask_sees_the_last_window_positions_of_each_row():
    mask = decode_mask(torch.tensor([3, 9, 6]), keys=9, window=4)  # [3, 1, 1, 9]
    rows = [torch.nonzero(m[0, 0]).flatten().tolist() for m in mask]
    assert rows == [[0, 1, 2], [5, 6, 7, 8], [2, 3, 4, 5]]
    full = decode_mask(torch.tensor([3, 9]), keys=9, window=None)
    assert full[:, 0, 0].sum(-1).tolist() == [3, 9]


def _qkv(n: int = 6, heads: int = 4, kv_heads: int = 2, d: int = 8):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, n, d, generator=gen) * 2
    k = torch.randn(2, kv_heads, n, d, generator=gen) * 2
    v = torch.randn(2, kv_heads, n, d, generator=gen)
    return q, k, v


def _additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("window", [None, 3])
def test_softcap_equals_gemma2_eager(window):
    q, k, v = _qkv()
    pos = torch.arange(q.shape[2])
    mask = visible(pos, pos, window)
    module = types.SimpleNamespace(num_key_value_groups=2, training=False)
    want, _ = gemma2_eager(module, q, k, v, _additive(mask), dropout=0.0, scaling=0.3, softcap=0.7)
    got = attend(q, k, v, mask, scale=0.3, softcap=0.7)
    torch.testing.assert_close(got.transpose(1, 2), want)
    # the cap bites at these magnitudes
    assert not torch.allclose(attend(q, k, v, mask, scale=0.3), got, atol=1e-3)


def test_sinks_equal_gpt_oss_eager():
    q, k, v = _qkv()
    pos = torch.arange(q.shape[2])
    mask = visible(pos, pos, 4)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    module = types.SimpleNamespace(num_key_value_groups=2, training=False, sinks=sinks)
    want, _ = gpt_oss_eager(module, q, k, v, _additive(mask), scaling=0.25)
    got = attend(q, k, v, mask, scale=0.25, sinks=sinks)
    torch.testing.assert_close(got.transpose(1, 2), want)


def test_causal_flag_equals_the_causal_mask():
    q, k, v = _qkv()
    pos = torch.arange(q.shape[2])
    for feats in (dict(), dict(softcap=1.0), dict(sinks=torch.zeros(4))):
        torch.testing.assert_close(attend(q, k, v, None, 0.3, causal=True, **feats),
                                   attend(q, k, v, visible(pos, pos, None), 0.3, **feats))  # fmt: skip


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_decode_equals_llama_eager(kv_heads):
    # one query per row over keys of different lengths: attend's decode form (the query heads of a KV
    # head as queries of it) against transformers' repeat_kv attention, MHA (kv_heads = heads) too
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 1, 8, generator=gen)  # [B, heads, 1, d]
    k = torch.randn(3, kv_heads, 9, 8, generator=gen)  # [B, kv_heads, L, d]
    v = torch.randn(3, kv_heads, 9, 8, generator=gen)
    mask = decode_mask(torch.tensor([9, 4, 1]), keys=9, window=None)  # [B, 1, 1, 9]
    module = types.SimpleNamespace(num_key_value_groups=4 // kv_heads, training=False)
    want, _ = llama_eager(module, q, k, v, _additive(mask), scaling=0.35)
    got = attend(q, k, v, mask, scale=0.35)
    torch.testing.assert_close(got.transpose(1, 2), want)
    assert not torch.allclose(got[:, 0], got[:, 1])  # the heads differ: no head reads another's query


def test_unknown_attention_arguments_are_named():
    got = unsupported_kwargs({"position_ids": 1, "sliding_window": 4, "alibi_slopes": 1, "x": None})
    assert got == ["alibi_slopes"]
