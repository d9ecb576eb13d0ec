"""Repetition, presence and frequency penalties from per-request token counts kept on the device.

For request b and token v, with c[b, v] its count among b's generated tokens and
seen[b, v] true when v is in b's prompt or output:

- repetition (as `transformers`' `RepetitionPenaltyLogitsProcessor`, over prompt and
  output): where seen, l = l * rp if l < 0 else l / rp;
- frequency and presence (as OpenAI defines them, over output only):
  l = l - frequency * c - presence * (c > 0).

Both are applied to the raw logits, before temperature (vLLM's order). The counts live
in one `[rows, vocab]` tensor; a request gets a row the first time it is penalised and
keeps it until `release`. Each step adds only the tokens generated since the last one
(one `index_put_` for the whole batch), so the work per step does not grow with the
sequence, and a step that is re-run after a failure counts nothing twice: what is
counted is always exactly `request.output_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramux.engine.request import Request


@dataclass
class _Row:
    index: int  # row of `counts` / `prompt`
    counted: int  # how many of the request's output tokens are in its counts


class Penalties:
    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # [cap, vocab] float32: generated-token counts
        self.prompt: torch.Tensor | None = None  # [cap, vocab] bool: tokens of the prompt
        self._rows: dict[Request, _Row] = {}
        self._free: list[int] = []

    @staticmethod
    def wanted(r: Request) -> bool:
        p = r.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    def release(self, r: Request) -> None:
        """Give the request's row back (it finished, failed or was dropped)."""
        row = self._rows.pop(r, None)
        if row is not None:
            self._free.append(row.index)

    @property
    def rows_held(self) -> int:
        return len(self._rows)

    def apply(self, logits: torch.Tensor, index: list[int], reqs: list[Request]) -> torch.Tensor:
        """Penalise rows `index` of logits [B, vocab] for requests `reqs` (one each); returns a new tensor."""
        dev, vocab = logits.device, logits.shape[1]
        rows = self._sync(reqs, vocab, dev)  # [P] rows of the state tensors
        params = torch.tensor(
            [[r.params.repetition_penalty, r.params.frequency_penalty, r.params.presence_penalty] for r in reqs],
            dtype=logits.dtype,
        ).to(dev, non_blocking=True)  # [P, 3]
        whole = len(index) == logits.shape[0]
        idx = None if whole else torch.tensor(index, device=dev)
        sub = logits if whole else logits.index_select(0, idx)  # [P, vocab]
        counts = self.counts.index_select(0, rows)  # [P, vocab]
        present = counts > 0
        if any(r.params.repetition_penalty != 1.0 for r in reqs):
            rp = params[:, 0:1]
            seen = present | self.prompt.index_select(0, rows)
            sub = torch.where(seen, torch.where(sub < 0, sub * rp, sub / rp), sub)
        if any(r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0 for r in reqs):
            sub = sub - params[:, 1:2] * counts - params[:, 2:3] * present
        if whole:
            return sub
        return logits.index_copy(0, idx, sub)

    def _sync(self, reqs: list[Request], vocab: int, dev: torch.device) -> torch.Tensor:
        """Rows for `reqs`, their counts brought up to date with their output tokens. Returns [P] long."""
        if self.counts is None or self.counts.shape[1] != vocab or self.counts.device != dev:
            self.counts = torch.zeros((8, vocab), device=dev)
            self.prompt = torch.zeros((8, vocab), dtype=torch.bool, device=dev)
            self._rows.clear()
            self._free = list(range(7, -1, -1))
        new_rows, new_toks = [], []
        out: list[int] = []
        for r in reqs:
            row = self._rows.get(r)
            if row is None:
                row = self._rows[r] = _Row(self._take(), 0)
                self.counts[row.index].zero_()
                self.prompt[row.index].zero_()
                if r.prompt_ids:
                    self.prompt[row.index, torch.tensor(r.prompt_ids, device=dev)] = True
            fresh = r.output_ids[row.counted :]
            new_rows.extend([row.index] * len(fresh))
            new_toks.extend(fresh)
            row.counted = len(r.output_ids)
            out.append(row.index)
        if new_toks:
            at = torch.tensor([new_rows, new_toks]).to(dev, non_blocking=True)  # [2, n]
            self.counts.index_put_((at[0], at[1]), torch.ones((), device=dev), accumulate=True)
        return torch.tensor(out).to(dev, non_blocking=True)

    def _take(self) -> int:
        if not self._free:
            cap = self.counts.shape[0]
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.prompt = torch.cat([self.prompt, torch.zeros_like(self.prompt)])
            self._free = list(range(2 * cap - 1, cap - 1, -1))
        return self._free.pop()
