"""The sampler: next tokens for a batch of requests, each with its own parameters, in a few batched ops.

Order, as vLLM does it: penalties on the raw logits (penalties.py; greedy rows get them
too), then for sampled rows temperature, top-k, top-p and min-p on the tempered
distribution, then one draw per row.

With l the (penalised) logits of a row and m = max(l), the tempered logits are
x = (l - m) / T. Subtracting m first changes nothing in softmax(x) but keeps x <= 0 with
x = 0 at the argmax, so no temperature > 0, however small, overflows (1e-40 gives the
greedy token, the limit of the distribution). On x:

- top-k keeps the k largest;
- top-p keeps, in descending order, every token whose preceding mass (of the top-k
  distribution, renormalised) is below p: the smallest set whose mass reaches p;
- min-p keeps tokens with p_v >= min_p * p_max, i.e. x_v >= log(min_p), since
  p_v / p_max = exp(x_v - 0). It is relative to the maximum, so it is the same on any
  renormalisation of the kept set.

The draw is by the inverse CDF: one uniform u per row, the token is the first whose
cumulative kept mass exceeds u times the total (float64 sums, so no kept token is
skipped and no dropped one is chosen). u is a counter-based hash of (the request's
seed, the index of the token it generates), computed on the host: a seeded request
draws the same numbers whatever shares its batch, on CPU and GPU alike, and a step that
is re-run after a failure draws the same token. An unseeded request gets a random seed
at submission.

A row whose logits are not finite (NaN or inf from the model) fails that request only:
its token comes back as None and every other row is sampled as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loramux.engine.penalties import Penalties
from loramux.engine.request import Request

_MASK64 = (1 << 64) - 1
_U_MAX = 1.0 - 2.0**-40  # u < 1 by a margin that float64 rounding of u * total cannot close


def uniform(seed: int, n: int) -> float:
    """The n-th uniform in [0, 1) of stream `seed` (splitmix64 of seed + (n + 1) * golden gamma)."""
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return min((z >> 11) * 2.0**-53, _U_MAX)


@dataclass
class Sampled:
    tokens: list[int | None]  # None: this row's logits were not finite; its request fails
    logprobs: list[float | None]  # the chosen token's raw log-probability, for rows that asked


class Sampler:
    def __init__(self) -> None:
        self.penalties = Penalties()

    def release(self, r: Request) -> None:
        """Forget a request's sampling state (it ended)."""
        self.penalties.release(r)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> Sampled:
        """logits: [B, vocab] float32, one row per request.

        The logprob is the chosen token's log-probability under the model's own
        distribution (before penalties, temperature, top-k, top-p and min-p), as vLLM's default.
        """
        want_lp = [i for i, r in enumerate(reqs) if r.return_logprobs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None  # [B, vocab]
        pen = [i for i, r in enumerate(reqs) if Penalties.wanted(r)]
        if pen:
            logits = self.penalties.apply(logits, pen, [reqs[i] for i in pen])
        top, tokens = logits.max(dim=-1)  # [B], [B]: the greedy token of every row
        sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if sampled:
            tokens = tokens.clone()
            tokens[sampled] = self._draw(logits, top, sampled, [reqs[i] for i in sampled])
        tokens = torch.where(torch.isfinite(top), tokens, -1)  # NaN propagates through max
        chosen = None
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, tokens.clamp(min=0)[:, None])[:, 0]  # [B]
            tokens = torch.stack([tokens.double(), chosen.double()])  # one transfer for both
        host = tokens.tolist()
        toks, lps = (host[0], host[1]) if chosen is not None else (host, [None] * len(reqs))
        out_toks = [int(t) if t >= 0 else None for t in toks]
        out_lps = [lps[i] if reqs[i].return_logprobs and out_toks[i] is not None else None for i in range(len(reqs))]
        return Sampled(out_toks, out_lps)

    @staticmethod
    def _draw(logits: torch.Tensor, top: torch.Tensor, index: list[int], reqs: list[Request]) -> torch.Tensor:
        """One token for each sampled row `index` [S]. Returns [S] long, in `index` order."""
        dev, vocab = logits.device, logits.shape[1]
        rows = [
            (r.params.temperature, r.params.top_k if 0 < r.params.top_k < vocab else 0, r.params.top_p,
             r.params.min_p, uniform(r.seed, len(r.output_ids)))
            for r in reqs
        ]  # fmt: skip
        params = torch.tensor(rows, dtype=torch.float64).to(dev, non_blocking=True)  # [S, 5]
        out = torch.empty(len(reqs), dtype=torch.long, device=dev)
        # Three groups by the work they need: top-k (a partial sort of max k), top-p alone (a full
        # sort), neither (no sort). Each group is a handful of batched ops. Sorting and top-k run on
        # the raw logits (x is monotone in l), so only the values kept are tempered.
        groups: dict[str, list[int]] = {"topk": [], "sort": [], "none": []}
        for j, (_t, k, p, _m, _u) in enumerate(rows):
            groups["topk" if k > 0 else "sort" if p < 1.0 else "none"].append(j)
        for kind, js in groups.items():
            if not js:
                continue
            everyone = len(js) == len(rows) and len(index) == logits.shape[0]
            sel = None if len(js) == len(rows) else torch.tensor(js, device=dev)  # into the sampled rows
            at = torch.tensor([index[j] for j in js], device=dev)  # [G] into the batch
            lg = logits if everyone else logits.index_select(0, at)  # [G, vocab] raw logits
            ps = params if sel is None else params.index_select(0, sel)  # [G, 5]
            if kind == "topk":
                kmax = max(rows[j][1] for j in js)
                vals, order = lg.topk(kmax, dim=-1)  # [G, K] descending, token ids [G, K]
            elif kind == "sort":
                vals, order = lg.sort(dim=-1, descending=True, stable=True)  # [G, vocab]
            else:
                vals, order = lg, None
            vals = (vals - top.index_select(0, at)[:, None]) / ps[:, 0:1].to(vals.dtype)  # x = (l - m) / T
            if kind == "topk":
                keep_k = torch.arange(kmax, device=dev)[None, :] < ps[:, 1:2]
                vals = vals.masked_fill(~keep_k, -math.inf)
            if kind != "none" and any(rows[j][2] < 1.0 for j in js):
                probs = torch.softmax(vals, dim=-1)
                before = probs.cumsum(-1) - probs  # mass ahead of each token, in descending order
                top_p = ps[:, 2:3].to(vals.dtype)
                drop = (before >= top_p) & (top_p < 1.0)  # rows without top-p drop nothing to rounding
                drop[:, 0] = False  # the most likely token always stays
                vals = vals.masked_fill(drop, -math.inf)
            if any(rows[j][3] > 0.0 for j in js):
                vals = vals.masked_fill(vals < torch.log(ps[:, 3:4]).to(vals.dtype), -math.inf)
            cum = torch.softmax(vals, dim=-1).cumsum(-1, dtype=torch.float64)  # [G, K]
            target = ps[:, 4:5] * cum[:, -1:]  # [G, 1], strictly below the total
            pick = torch.searchsorted(cum, target, right=True)  # first index with cum > target
            pick = pick.clamp(max=cum.shape[1] - 1)[:, 0]  # [G]
            tok = pick if order is None else order.gather(1, pick[:, None])[:, 0]
            if sel is None:
                out = tok
            else:
                out[sel] = tok
        return out
