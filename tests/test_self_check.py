"""The model self-check: a model the engine cannot serve exactly is refused before SERVING, and named.

The models here are real transformers models with one part changed the way third-party
model code is written: decoder layers that do not pass their keyword arguments on, an
attention that computes itself instead of calling the attention interface, an attention
that asks the interface for a feature loramux does not implement.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from architectures import ARCHS
from transformers.models.llama import modeling_llama as ml

from loramux.adapters.model.wrapped import WrappedModel
from loramux.config import EngineConfig
from loramux.engine.engine import Engine
from loramux.engine.self_check import ModelCheckFailed, check_prompts
from loramux.model import BaseModel, build_from_config, byte_tokenizer, tiny_llama_config


class DroppingLayer(ml.LlamaDecoderLayer):
    """A decoder layer that passes only what it names to its attention (StableLM's are like this)."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,  # noqa: ANN001, ANN201
                use_cache=False, position_embeddings=None, **kwargs):  # fmt: skip
        residual = hidden_states
        h, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask)
        h = residual + h
        return h + self.mlp(self.post_attention_layernorm(h))


class BypassAttention(ml.LlamaAttention):
    """Attention computed in the module itself (as GPT-Neo's is), not through the attention interface."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):  # noqa: ANN001, ANN201
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = ml.apply_rotary_pos_emb(q, k, *position_embeddings)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None


class AlibiAttention(ml.LlamaAttention):
    """Attention that asks the interface for ALiBi slopes, which loramux's attention does not implement."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):  # noqa: ANN001, ANN201
        slopes = torch.full((self.config.num_attention_heads,), 0.5)
        return super().forward(hidden_states, position_embeddings, attention_mask, cache, alibi_slopes=slopes, **kwargs)


def model_with(part: str):  # noqa: ANN201
    """The tiny Llama with every layer's `part` replaced by the class above, same weights."""
    model = build_from_config(tiny_llama_config(), seed=0)
    for i, layer in enumerate(model.model.layers):
        if part == "layer":
            new = DroppingLayer(model.config, i)
            new.load_state_dict(layer.state_dict())
            model.model.layers[i] = new
        else:
            cls = BypassAttention if part == "bypass" else AlibiAttention
            new = cls(model.config, i)
            new.load_state_dict(layer.self_attn.state_dict())
            layer.self_attn = new
    return model.eval().requires_grad_(False)


def engine_for(model) -> Engine:  # noqa: ANN001
    base = BaseModel(model=model, tokenizer=byte_tokenizer(), device=torch.device("cpu"), dtype=torch.float32,
                     name="custom")  # fmt: skip
    return Engine(base, WrappedModel(model, num_slots=2), EngineConfig(max_running=4, max_model_len=128))


def test_the_plain_model_passes():
    engine_for(build_from_config(tiny_llama_config(), seed=0)).self_check()


def test_layers_that_drop_their_kwargs_are_served_exactly():
    """Attention reads its metadata from the runner's holder, not from kwargs: nothing for a layer to drop."""
    model = model_with("layer")
    engine = engine_for(model)
    engine.self_check()  # passes: the logits equal transformers' in every layout
    from test_runner import PROMPTS

    from loramux.engine.request import Request, SamplingParams
    from loramux.engine.runner import Batch

    reqs = [Request("r", list(p), SamplingParams()) for p in PROMPTS]
    pool = engine.pool
    for b in [Batch(prefill=reqs, decode=[])] + [Batch(prefill=[], decode=reqs) for _ in range(5)]:
        for r in b.requests:  # the scheduler's part: the positions to compute and their blocks
            r.num_scheduled = r.seq_len - r.num_computed
            while pool.block_size * len(r.block_table) < r.seq_len:
                r.block_table.append(pool.allocate())
        for r, row in zip(b.requests, engine.runner.run(b)):
            engine.runner.commit(r)
            r.output_ids.append(int(row.argmax()))
    # The reference recomputes the whole sequence each step: such layers drop transformers' own KV cache too.
    model.set_attn_implementation("sdpa")
    for r in reqs:
        ids = list(r.prompt_ids)
        for _ in range(6):
            with torch.inference_mode():
                ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        assert r.output_ids == ids[len(r.prompt_ids) :]


def test_attention_that_bypasses_the_interface_is_refused():
    with pytest.raises(ModelCheckFailed, match="BypassAttention.*does not go through transformers' attention"):
        engine_for(model_with("bypass")).self_check()


def test_an_attention_feature_loramux_lacks_is_refused_by_name():
    with pytest.raises(ModelCheckFailed, match="alibi_slopes"):
        engine_for(model_with("alibi")).self_check()


def test_the_check_prompts_reach_past_the_sliding_window():
    (mistral,) = [a for a in ARCHS if a.name == "mistral"]
    prompts = check_prompts(mistral.config(), vocab=259, max_len=128)
    assert max(len(p) for p in prompts) > mistral.config().sliding_window + 1


def test_serve_exits_non_zero_naming_the_architecture(tmp_path):
    """A real `loramux serve` process on a GPT-Neo directory: refused at start, exit code 1, never SERVING."""
    from test_architectures import build

    (neo,) = [a for a in ARCHS if a.name == "gpt_neo"]
    build(neo.config()).save_pretrained(tmp_path / "gpt_neo")
    byte_tokenizer().save_pretrained(tmp_path / "gpt_neo")
    cmd = [sys.executable, "-m", "loramux.cli", "serve", "--model", str(tmp_path / "gpt_neo"), "--store",
           str(tmp_path / "store"), "--port", "0", "--metrics-port", "0", "--host", "127.0.0.1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "GPTNeoForCausalLM" in proc.stderr and "attention interface" in proc.stderr
