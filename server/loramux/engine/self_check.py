"""The model self-check: before SERVING, the engine's logits must equal plain transformers'.

A model the engine cannot serve exactly (an attention module that bypasses the
attention interface, decoder layers that drop what attention needs, an attention
feature the flat attention does not implement) would otherwise be served wrong,
silently. So a few fixed prompts run through the runner in the layouts the engine
uses (several prefills in one forward; a prefill beside decodes; a prefill after
cached context, as a prefix hit or a later chunk writes it; decodes of rows of
different lengths) and through the same model on its own attention implementation,
and every step's last-token logits are compared.

The prompts are longer than the smallest sliding window of the model (up to a cap),
so that a window that is ignored shows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from loramux.engine.kv_blocks import BlockPool
from loramux.engine.request import Request, SamplingParams
from loramux.engine.runner import Batch, Runner

log = logging.getLogger("loramux.self_check")

DECODE_STEPS = 6
CHECK_BLOCK = 4  # tokens per block of the check's own pool: every sequence spans several blocks
LONGEST_PROMPT = 512


class ModelCheckFailed(RuntimeError):
    """The engine does not compute what plain transformers computes for this model."""


def smallest_window(config: object) -> int | None:
    """The model's sliding window, if its config names one (whether every layer uses it or not)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


def check_prompts(config: object, vocab: int, max_len: int) -> list[list[int]]:
    """Three fixed prompts, the first longer than the smallest sliding window (when one fits)."""
    window = smallest_window(config)
    long = 24 if window is None else min(window + 8, LONGEST_PROMPT)
    long = max(4, min(long, max_len - DECODE_STEPS - 1))
    gen = torch.Generator().manual_seed(1234)
    low = 3 if vocab > 16 else 0  # keep clear of the usual special ids 0..2

    def ids(n: int) -> list[int]:
        return torch.randint(low, vocab, (n,), generator=gen).tolist()

    return [ids(long), ids(min(7, long)), ids(min(13, long))]


def tolerance(dtype: torch.dtype) -> float:
    """Allowed |Δlogit| relative to the largest reference logit: rounding, not a different function."""
    return 2e-3 if dtype == torch.float32 else 6e-2


@contextmanager
def own_attention(model: PreTrainedModel, impl: str) -> Iterator[None]:
    """Run `model` on transformers' own attention implementation `impl`, then switch back."""
    current = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(current)


@torch.inference_mode()
def reference_logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """Plain transformers: the last position's logits [vocab] of one sequence, alone, no cache."""
    dev = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=dev), use_cache=False, logits_to_keep=1)
    return out.logits[0, -1].float()


def self_check(runner: Runner, reference_impl: str, max_len: int, architecture: str) -> None:
    """Raise ModelCheckFailed naming the first mismatch; returns quietly when every step agrees."""
    model = runner.model
    vocab = int(model.get_output_embeddings().weight.shape[0])
    prompts = check_prompts(model.config, vocab, max_len)
    # A block pool of its own, small blocks so that every sequence spans several (the engine's pool is left alone).
    longest = max(len(p) for p in prompts) + DECODE_STEPS
    saved, runner.pool = runner.pool, BlockPool(3 * -(-longest // CHECK_BLOCK), CHECK_BLOCK)
    # the eager forward is checked here; the compiled one is checked against eager when it compiles (compiled.py)
    compiled, runner.compiled = runner.compiled, None
    params = SamplingParams(max_new_tokens=DECODE_STEPS)
    reqs = [Request(f"self-check-{i}", list(p), params) for i, p in enumerate(prompts)]
    a, b, c = reqs
    split = max(1, len(prompts[0]) // 2)
    a.prompt_ids = prompts[0][:split]  # its first half now, the rest later as a prefill after context
    try:
        # (what, request, its ids up to the step, the engine's logits [vocab]) of every step
        got: list[tuple[str, Request, list[int], torch.Tensor]] = []

        def run(what: str, batch: Batch) -> None:
            for r in batch.requests:
                runner.schedule_rest(r)
            try:
                logits = runner.run(batch)  # [len(batch.requests), vocab]
            except Exception as e:
                raise ModelCheckFailed(f"{architecture}: the engine's forward fails ({what}): {e}") from e
            _check_coverage(runner, architecture)
            for r, row in zip(batch.requests, logits):
                runner.commit(r)  # its K/V are in the cache now (run moves no request's state)
                got.append((what, r, r.all_ids, row))
                if not (r is a and len(a.prompt_ids) < len(prompts[0])):
                    r.output_ids.append(int(row.argmax()))

        run("two prefills in one forward", Batch(prefill=[a, b], decode=[]))
        a.prompt_ids = list(prompts[0])
        run("a prefill after cached context, a new prefill and a decode", Batch(prefill=[a, c], decode=[b]))
        for step in range(DECODE_STEPS - 2):
            run(f"decode step {step + 1} of rows of different lengths", Batch(prefill=[], decode=[a, b, c]))
        # Reference: the same sequences, each alone, on transformers' own attention.
        tol = tolerance(next(model.parameters()).dtype)
        with own_attention(model, reference_impl):
            for what, r, ids, row in got:
                want = reference_logits(model, ids)
                err = float((row - want).abs().max())
                scale = float(want.abs().max()) or 1.0
                if err > tol * scale:
                    raise ModelCheckFailed(
                        f"{architecture}: the engine's logits differ from transformers' ({what}, request "
                        f"{r.request_id} at position {len(ids) - 1}: max |Δ| {err:.3g} vs logits up to {scale:.3g})"
                    )
    finally:
        runner.pool, runner.compiled = saved, compiled
    log.info("model self-check passed: %s, %d steps against transformers' %s attention", architecture,
             len(got), reference_impl)  # fmt: skip


def _check_coverage(runner: Runner, architecture: str) -> None:
    """Every decoder layer's attention must have gone through the attention interface in the last forward."""
    cfg = runner.model.config.get_text_config()
    want = set(range(int(getattr(cfg, "num_hidden_layers", 0) or 0)))
    missing = sorted(want - runner.layers_attended)
    if missing:
        names = sorted({type(m).__name__ for m in runner.model.modules() if type(m).__name__.endswith("Attention")})
        raise ModelCheckFailed(
            f"{architecture}: the attention of layers {missing[:8]} ({', '.join(names) or 'unknown module'}) does "
            "not go through transformers' attention interface, so loramux cannot give it its KV cache; "
            "this architecture is not supported"
        )
