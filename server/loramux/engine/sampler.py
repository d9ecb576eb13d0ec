"""The sampler: next tokens for a batch of requests, each with its own parameters."""

from __future__ import annotations

import torch

from loramux.engine.request import Request


class Sampler:
    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[float | None]]:
        """logits: [B, vocab] float32, one row per request. Returns (token, logprob or None) per row.

        The logprob is the chosen token's log-probability under the model's own
        distribution (before temperature, top-k/top-p and repetition penalty).
        """
        raw_logprobs = None
        if any(r.return_logprobs for r in reqs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_repetition_penalty(logits, reqs)

        tokens = logits.argmax(dim=-1)  # [B]: greedy for every row, replaced below for sampled rows
        for i, r in enumerate(reqs):
            if not r.params.greedy:
                tokens[i] = self._sample_row(logits[i], r)
        token_list = tokens.tolist()
        if raw_logprobs is None:
            return token_list, [None] * len(reqs)
        chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        return token_list, [lp if r.return_logprobs else None for lp, r in zip(chosen, reqs)]

    @staticmethod
    def _apply_repetition_penalty(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        # As transformers does: every token seen so far (prompt and output) has its
        # logit divided by the penalty when positive, multiplied when negative.
        rows = [i for i, r in enumerate(reqs) if r.params.repetition_penalty != 1.0]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            penalty = reqs[i].params.repetition_penalty
            seen = torch.tensor(sorted(set(reqs[i].all_ids)), device=logits.device, dtype=torch.long)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals < 0, vals * penalty, vals / penalty)
        return logits

    @staticmethod
    def _sample_row(row: torch.Tensor, r: Request) -> int:
        # row: [vocab]
        p = r.params
        row = row / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, idx = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the mass before it already reaches top_p (the first always stays)
            drop = probs.cumsum(-1) - probs >= p.top_p
            row = row.scatter(0, idx, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(row, dim=-1)
        return int(torch.multinomial(probs, 1, generator=r.generator).item())
