"""Helpers for the PEFT oracle tests: make adapters with PEFT, run flat mixed batches through loramux."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from loramux.adapters.model.wrapped import WrappedModel
from loramux.engine.forward_context import BASE_SLOT, AdapterContext
from loramux.model import build_from_config


def make_peft_adapter(
    base_config, peft_config: PeftConfig, path: Path, seed: int, perturb_biases: bool = False
) -> PeftModel:
    """A PEFT model over the seed-0 base with random (non-trivial) adapter weights, saved to `path`."""
    peft_model = get_peft_model(build_from_config(base_config, seed=0), peft_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "lora_magnitude_vector" in name or "ia3_l" in name:
                p.mul_(1 + 0.3 * noise)  # scale vectors: perturb around their init
            elif "lora_" in name:
                p.copy_(0.2 * noise)
            elif perturb_biases and p.requires_grad and name.endswith("bias") and _owner_is_linear(peft_model, name):
                p.add_(0.2 * noise)
    peft_model.save_pretrained(str(path))
    return peft_model.eval()


def _owner_is_linear(model: torch.nn.Module, param_name: str) -> bool:
    owner = model.get_submodule(param_name.rsplit(".", 1)[0])
    return isinstance(owner, (torch.nn.Linear, Conv1D))


def flat_batch(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate 1-D token sequences into one [1, T] row with a block-diagonal causal mask.

    Returns input_ids [1, T], attention_mask [1, 1, T, T] (bool, True = may attend), position_ids [1, T].
    """
    ids = torch.cat(seqs)[None]
    total = ids.shape[1]
    allowed = torch.zeros(total, total, dtype=torch.bool)
    pos = []
    start = 0
    for s in seqs:
        n = s.shape[0]
        allowed[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        pos.append(torch.arange(n))
        start += n
    return ids, allowed[None, None], torch.cat(pos)[None]


@torch.no_grad()
def mixed_logits(wrapped: WrappedModel, seqs: list[torch.Tensor], slots: list[int]) -> list[torch.Tensor]:
    """One forward over all sequences at once, each row under its sequence's slot; per-sequence logits [n, vocab].

    Sequences must already be ordered so that equal slots are adjacent (the runner's contract).
    """
    ids, mask, pos = flat_batch(seqs)
    row_slots = [slot for s, slot in zip(seqs, slots) for _ in range(s.shape[0])]
    wrapped.holder.set(AdapterContext.from_row_slots(row_slots, ids.device))
    try:
        logits = wrapped.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0]
    finally:
        wrapped.holder.set(None)
    return list(logits.split([s.shape[0] for s in seqs]))


@torch.no_grad()
def greedy(step_logits, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens by repeated full forward; step_logits(ids [n]) -> logits [n, vocab]."""
    ids = prompt.clone()
    out = []
    for _ in range(steps):
        tok = int(step_logits(ids)[-1].argmax())
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([tok])])
    return out


def transformers_greedy(model: PreTrainedModel, ids: list[int], n: int) -> list[int]:
    """The oracle's greedy continuation: `generate` with sampling off, EOS ignored (n new token ids)."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(ids) :].tolist()


def wrapped_greedy(wrapped: WrappedModel, slot: int, prompt: torch.Tensor, steps: int) -> list[int]:
    return greedy(lambda ids: mixed_logits(wrapped, [ids], [slot])[0], prompt, steps)


def reference_logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """The oracle's logits [n, vocab] for one sequence (a PeftModel, or the plain base model)."""
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


__all__ = ["BASE_SLOT", "flat_batch", "greedy", "make_peft_adapter", "mixed_logits", "reference_logits"]
