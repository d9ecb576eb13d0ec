"""The runner: turns a scheduled batch into tensors, sets the per-forward contexts, runs the model."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from loramux.adapters.context import AdapterContext

if TYPE_CHECKING:
    from loramux.adapters.wrapped import WrappedModel
from loramux.engine import attention
from loramux.engine.attention import META_KWARG, AttentionMeta, PrefillSeq
from loramux.engine.kv_cache import KVCache
from loramux.engine.request import Request


@dataclass
class Batch:
    """One forward's worth of work: new prompts to prefill and running sequences to extend."""

    prefill: list[Request]
    decode: list[Request]
    merged_slot: int = -1
    # run merged_slot's rows in a forward of their own, the other rows in a second one (merge_policy.py)
    split_merged: bool = False

    @property
    def requests(self) -> list[Request]:
        return self.prefill + self.decode

    @property
    def num_tokens(self) -> int:
        return sum(r.total_len - r.num_computed for r in self.prefill) + len(self.decode)


class Runner:
    def __init__(self, wrapped: WrappedModel, cache: KVCache) -> None:
        self.wrapped = wrapped
        self.model = wrapped.model
        self.cache = cache
        self.device = wrapped.device
        attention.register()
        self.model.set_attn_implementation(attention.ATTN_IMPL)

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Run one forward; returns the next-token logits of every request, in `batch.requests` order.

        logits: [len(batch.requests), vocab], float32.
        """
        if batch.split_merged:
            return self._run_split(batch)
        reqs = batch.requests
        # Rows are grouped by adapter slot so each adapter is one contiguous segment;
        # within a request its tokens stay contiguous and in order.
        # The merged slot's rows go last, so the rows that undo its delta form one span (layers.py).
        m = batch.merged_slot
        order = sorted(range(len(reqs)), key=lambda i: (m >= 0 and reqs[i].adapter_slot == m, reqs[i].adapter_slot))
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        slots: list[int] = []
        last_token = [0] * len(reqs)
        dec_tokens: list[int] = []
        dec_rows: list[int] = []
        dec_lens: list[int] = []
        prefills: list[PrefillSeq] = []
        n_prefill = len(batch.prefill)
        for i in order:
            r = reqs[i]
            start = len(ids)
            new = r.all_ids[r.num_computed :]
            ids.extend(new)
            pos.extend(range(r.num_computed, r.num_computed + len(new)))
            rows.extend([r.kv_slot] * len(new))
            slots.extend([r.adapter_slot] * len(new))
            last_token[i] = len(ids) - 1
            if i < n_prefill or len(new) != 1:
                prefills.append(PrefillSeq(start, len(new), r.kv_slot, r.num_computed))
            else:
                dec_tokens.append(start)
                dec_rows.append(r.kv_slot)
                dec_lens.append(r.num_computed + 1)

        dev = self.device
        meta = AttentionMeta(
            cache=self.cache,
            write_rows=torch.tensor(rows, device=dev),
            write_pos=torch.tensor(pos, device=dev),
            dec_tokens=torch.tensor(dec_tokens, device=dev) if dec_tokens else None,
            dec_rows=torch.tensor(dec_rows, device=dev) if dec_rows else None,
            dec_mask=_length_mask(dec_lens, dev) if dec_lens else None,
            prefills=prefills,
        )
        self.wrapped.holder.set(AdapterContext.from_row_slots(slots, dev, merged_slot=batch.merged_slot))
        try:
            out = self.model(
                input_ids=torch.tensor([ids], device=dev),
                position_ids=torch.tensor([pos], device=dev),
                use_cache=False,
                logits_to_keep=torch.tensor(last_token, device=dev),
                **{META_KWARG: meta},
            )
        finally:
            self.wrapped.holder.set(None)
        for r in reqs:
            r.num_computed = r.total_len
        return out.logits[0].float()  # [len(reqs), vocab]

    def _run_split(self, batch: Batch) -> torch.Tensor:
        """Two forwards: the merged slot's rows on its merged weights (no adapter arithmetic), the rest unmerged."""
        m = batch.merged_slot
        subs = [
            replace(batch, prefill=[r for r in batch.prefill if (r.adapter_slot == m) == mine],
                    decode=[r for r in batch.decode if (r.adapter_slot == m) == mine],
                    merged_slot=m if mine else -1, split_merged=False)
            for mine in (True, False)
        ]  # fmt: skip
        index = {r: i for i, r in enumerate(batch.requests)}
        out: torch.Tensor | None = None
        for sub in subs:
            if not sub.requests:
                continue
            logits = self.run(sub)  # [len(sub.requests), vocab]
            if out is None:
                out = logits.new_empty((len(index), logits.shape[1]))
            out[[index[r] for r in sub.requests]] = logits
        return out


def _length_mask(lengths: list[int], device: torch.device) -> torch.Tensor:
    # [B, 1, 1, L]: key position j is visible to sequence b when j < lengths[b]
    lens = torch.tensor(lengths, device=device)
    return (torch.arange(int(max(lengths)), device=device)[None, :] < lens[:, None])[:, None, None, :]
