"""Tiny configs of the architectures the matrix test serves, each with its special features switched on.

Every config is small (2 layers, hidden 32-64) but keeps what makes its architecture
different, sized so that it changes the output of a 20-token test sequence:
sliding windows of 5 tokens (shorter than every test sequence), Gemma 2's attention
soft-cap at a value that bites, Granite's multipliers, Cohere's logit scale, partial
rotary embeddings, fused projections, untied embeddings (a random model with tied
ones tends to repeat one token).
"""

from __future__ import annotations

from dataclasses import dataclass

import transformers as tf

from loramux.model import BYTE_VOCAB_SIZE

WINDOW = 5

COMMON = dict(vocab_size=BYTE_VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
LLAMA_LIKE = dict(
    COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, initializer_range=0.1,
)  # fmt: skip


@dataclass(frozen=True)
class Arch:
    name: str
    config_class: type
    kwargs: dict
    lora_targets: list[str]
    # the served result must be the refusal at start, with these words in it (None: served exactly)
    refused: tuple[str, ...] | None = None
    # config overrides that each switch one special feature off: the reference must then differ (it bites)
    without_feature: tuple[dict, ...] = ()

    def config(self, **overrides: object):  # noqa: ANN201
        return self.config_class(**{**self.kwargs, **overrides})


QV_DOWN = ["q_proj", "v_proj", "down_proj"]
ARCHS = [
    Arch("llama", tf.LlamaConfig, LLAMA_LIKE, QV_DOWN),
    Arch("qwen2", tf.Qwen2Config, dict(LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
         QV_DOWN, without_feature=(dict(use_sliding_window=False),)),
    Arch("qwen3", tf.Qwen3Config, dict(LLAMA_LIKE, head_dim=16), QV_DOWN),
    Arch("mistral", tf.MistralConfig, dict(LLAMA_LIKE, sliding_window=WINDOW), QV_DOWN,
         without_feature=(dict(sliding_window=None),)),
    Arch("mixtral", tf.MixtralConfig,
         dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW), ["q_proj", "v_proj"],
         without_feature=(dict(sliding_window=None),)),
    Arch("gemma", tf.GemmaConfig, dict(LLAMA_LIKE, head_dim=16), QV_DOWN),
    Arch("gemma2", tf.Gemma2Config,
         dict(LLAMA_LIKE, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=1.0, final_logit_softcapping=5.0,
              query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"]),
         QV_DOWN, without_feature=(dict(attn_logit_softcapping=None), dict(sliding_window=64))),
    Arch("gemma3", tf.Gemma3TextConfig,
         dict(LLAMA_LIKE, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
              layer_types=["sliding_attention", "full_attention"]),
         QV_DOWN, without_feature=(dict(sliding_window=64),)),
    Arch("phi3", tf.Phi3Config, dict(LLAMA_LIKE, sliding_window=WINDOW), ["qkv_proj", "down_proj"],
         without_feature=(dict(sliding_window=None),)),
    Arch("phi", tf.PhiConfig, dict(LLAMA_LIKE, partial_rotary_factor=0.5, qk_layernorm=True),
         ["q_proj", "v_proj", "fc2"]),
    Arch("gpt_neox", tf.GPTNeoXConfig,
         dict(COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, rotary_pct=0.25, initializer_range=0.1),
         ["query_key_value", "dense_4h_to_h"]),
    Arch("gptj", tf.GPTJConfig,
         dict(COMMON, n_embd=64, n_layer=2, n_head=4, n_positions=128, rotary_dim=8, initializer_range=0.1),
         ["q_proj", "v_proj", "fc_out"]),
    Arch("opt", tf.OPTConfig,
         dict(COMMON, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, word_embed_proj_dim=64, init_std=0.1),
         ["q_proj", "v_proj", "fc2"]),
    # served since transformers' Falcon went through the attention interface (it did not before 5.2x)
    Arch("falcon", tf.FalconConfig,
         dict(COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
              new_decoder_architecture=True, initializer_range=0.1),
         ["query_key_value"]),
    # GPT-Neo's attention computes its scores itself, past the attention interface: refused
    Arch("gpt_neo", tf.GPTNeoConfig,
         dict(COMMON, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
              window_size=WINDOW, max_position_embeddings=128, initializer_range=0.1),
         ["q_proj", "v_proj"], refused=("GPTNeoForCausalLM", "attention interface")),
    Arch("stablelm", tf.StableLmConfig, dict(LLAMA_LIKE, partial_rotary_factor=0.25), QV_DOWN),
    Arch("granite", tf.GraniteConfig,
         dict(LLAMA_LIKE, embedding_multiplier=2.0, attention_multiplier=0.5, residual_multiplier=0.5,
              logits_scaling=0.5),
         QV_DOWN, without_feature=(dict(attention_multiplier=0.25),)),
    Arch("olmo2", tf.Olmo2Config, LLAMA_LIKE, QV_DOWN),
    Arch("cohere", tf.CohereConfig, dict(LLAMA_LIKE, logit_scale=0.5, use_qk_norm=False), QV_DOWN),
    # not one of the 19 asked for: the one with attention sinks (and local/global layers, MoE)
    Arch("gpt_oss", tf.GptOssConfig,
         dict(LLAMA_LIKE, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
              layer_types=["sliding_attention", "full_attention"]),
         ["q_proj", "v_proj"], without_feature=(dict(sliding_window=64),)),
    Arch("gpt2", tf.GPT2Config,
         dict(COMMON, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.1), ["c_attn", "c_proj"]),
]  # fmt: skip
