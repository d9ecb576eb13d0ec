"""Repetition, presence and frequency penalties from per-request token counts kept on the device.

For request b and token v, with c[b, v] its count among b's generated tokens and
seen[b, v] true when v is in b's prompt or output:

- repetition (as `transformers`' `RepetitionPenaltyLogitsProcessor`, over prompt and
  output): where seen, l = l * rp if l < 0 else l / rp;
- frequency and presence (as OpenAI defines them, over output only):
  l = l - frequency * c - presence * (c > 0).

Both are applied to the raw logits, before temperature (vLLM's order). The state is kept
per request row (a row is taken the first time a request is penalised and kept until
`release`) in `[rows, vocab]` tensors that already hold each request's penalty, so that
a step costs a gather and a few elementwise passes over the penalised rows, not a
rebuild from the token history:

- `mul[b, v]` = rp where seen, else 1: l * mul or l / mul is exact where unseen (x * 1 = x);
- `add[b, v]` = -(frequency * c + presence * (c > 0));
- `counts[b, v]` = c, from which `add` is recomputed where a token was just generated.

Each step adds only the tokens generated since the last one (a few `index_put_` over
those tokens for the whole batch), so the work does not grow with the sequence, and a
step that is re-run after a failure counts nothing twice: what is counted is always
exactly `request.output_ids`.
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
        self.counts: torch.Tensor | None = None  # [cap, vocab] int32: generated-token counts
        self.mul: torch.Tensor | None = None  # [cap, vocab] float32: the repetition penalty where seen, else 1
        self.add: torch.Tensor | None = None  # [cap, vocab] float32: -(frequency * count + presence * (count > 0))
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
        dev = logits.device
        rows = self._sync(reqs, logits.shape[1], dev)  # [P] rows of the state tensors
        whole = len(index) == logits.shape[0]
        idx = None if whole else torch.tensor(index, device=dev)
        sub = logits if whole else logits.index_select(0, idx)  # [P, vocab]
        if any(r.params.repetition_penalty != 1.0 for r in reqs):
            m = self.mul.index_select(0, rows)  # [P, vocab]
            sub = torch.where(sub < 0, sub * m, sub / m)
        if any(r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0 for r in reqs):
            sub = sub + self.add.index_select(0, rows)
        if whole:
            return sub
        return logits.index_copy(0, idx, sub)

    def _sync(self, reqs: list[Request], vocab: int, dev: torch.device) -> torch.Tensor:
        """Rows for `reqs`, their state brought up to date with their output tokens. Returns [P] long."""
        if self.counts is None or self.counts.shape[1] != vocab or self.counts.device != dev:
            self.counts = torch.zeros((8, vocab), dtype=torch.int32, device=dev)
            self.mul = torch.ones((8, vocab), device=dev)
            self.add = torch.zeros((8, vocab), device=dev)
            self._rows.clear()
            self._free = list(range(7, -1, -1))
        at_rows: list[int] = []
        at_toks: list[int] = []
        at_vals: list[tuple[float, float, float]] = []  # (rp, frequency, presence) of each new token
        out: list[int] = []
        for r in reqs:
            p = r.params
            row = self._rows.get(r)
            if row is None:
                row = self._rows[r] = _Row(self._take(), 0)
                self.counts[row.index].zero_()
                self.mul[row.index].fill_(1.0)
                self.add[row.index].zero_()
                if r.prompt_ids and p.repetition_penalty != 1.0:
                    self.mul[row.index, torch.tensor(r.prompt_ids, device=dev)] = p.repetition_penalty
            fresh = r.output_ids[row.counted :]
            at_rows.extend([row.index] * len(fresh))
            at_toks.extend(fresh)
            at_vals.extend([(p.repetition_penalty, p.frequency_penalty, p.presence_penalty)] * len(fresh))
            row.counted = len(r.output_ids)
            out.append(row.index)
        if at_toks:
            at = torch.tensor([at_rows, at_toks]).to(dev, non_blocking=True)  # [2, n]
            vals = torch.tensor(at_vals, dtype=self.add.dtype).to(dev, non_blocking=True)  # [n, 3]
            where = (at[0], at[1])
            self.counts.index_put_(where, torch.ones((), dtype=torch.int32, device=dev), accumulate=True)
            c = self.counts[where].to(self.add.dtype)  # [n]: counts after this step (repeats write the same)
            self.mul.index_put_(where, vals[:, 0])
            self.add.index_put_(where, -(vals[:, 1] * c + vals[:, 2] * (c > 0)))
        return torch.tensor(out).to(dev, non_blocking=True)

    def _take(self) -> int:
        if not self._free:
            cap = self.counts.shape[0]
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.mul = torch.cat([self.mul, torch.ones_like(self.mul)])
            self.add = torch.cat([self.add, torch.zeros_like(self.add)])
            self._free = list(range(2 * cap - 1, cap - 1, -1))
        return self._free.pop()
