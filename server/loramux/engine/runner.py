"""The runner: turns a scheduled batch into tensors, sets the one per-forward context, runs the model."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from loramux.engine import attention
from loramux.engine.attention import AttentionMeta, PrefillSeq
from loramux.engine.forward_context import AdapterContext
from loramux.engine.kv_cache import KVCache
from loramux.engine.request import Request

if TYPE_CHECKING:
    from loramux.adapters.model.wrapped import WrappedModel


@dataclass
class Batch:
    """One forward's worth of work: new prompts to prefill and running sequences to extend."""

    prefill: list[Request]
    decode: list[Request]
    merged_slot: int = -1
    # run merged_slot's rows in a forward of their own, the other rows in a second one (adapters/cache/merge_policy.py)
    split_merged: bool = False

    @property
    def requests(self) -> list[Request]:
        return self.prefill + self.decode


class Runner:
    def __init__(self, wrapped: WrappedModel, cache: KVCache, lora_path: str = "auto") -> None:
        self.wrapped = wrapped
        self.lora_path = lora_path  # forward_context.LORA_PATHS
        self.model = wrapped.model
        self.cache = cache
        self.device = wrapped.device
        # transformers' own attention implementation, before loramux's replaces it (the self-check's reference)
        self.reference_impl: str = self.model.config._attn_implementation or "eager"
        attention.register()
        self.model.set_attn_implementation(attention.ATTN_IMPL)
        # attention reads its metadata from the one per-forward context, as the wrapped layers do
        attention.attach(self.model, wrapped.holder)
        # the layers whose attention ran in the last forward (the self-check reads it)
        self.layers_attended: set[int] = set()

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
        # The merged slot's rows go last, so the rows that undo its delta form one span (adapters/model/linear.py).
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
        # (flat row of the first virtual token, its embeddings [n, hidden]) of prompt-tuned prefills
        virtual: list[tuple[int, torch.Tensor]] = []
        for i in order:
            r = reqs[i]
            start = len(ids)
            if r.num_computed < r.num_virtual:
                self._place_soft_prompt(r, start, ids, virtual)
            # A soft-prompted row holds [virtual][prompt][output]: position p is all_ids[p - num_virtual].
            ids.extend(r.ids_from(max(r.num_computed - r.num_virtual, 0)))
            n = len(ids) - start
            pos.extend(range(r.num_computed, r.num_computed + n))
            rows.extend([r.kv_slot] * n)
            slots.extend([r.adapter_slot] * n)
            last_token[i] = len(ids) - 1
            if i < n_prefill or n != 1:
                prefills.append(PrefillSeq(start, n, r.kv_slot, r.num_computed))
            else:
                dec_tokens.append(start)
                dec_rows.append(r.kv_slot)
                dec_lens.append(r.num_computed + 1)

        dev = self.device
        # Dense decode attention reads cache rows 0..R-1 as views; worth it while few of them
        # are idle (rows are handed out lowest-first, so running ones stay packed).
        dense = bool(dec_rows) and max(dec_rows) + 1 <= 2 * len(dec_rows)
        mask_lens = _mask_lengths(dec_lens, dec_rows if dense else None)
        # Every index tensor of this forward in one host buffer and one copy to the device.
        t = to_device([ids, pos, rows, slots, last_token, dec_tokens, dec_rows, mask_lens], dev)
        t_ids, t_pos, t_rows, t_slots, t_last, t_dec_tokens, t_dec_rows, t_lens = t
        meta = AttentionMeta(
            cache=self.cache,
            write_rows=t_rows,
            write_pos=t_pos,
            dec_tokens=t_dec_tokens if dec_tokens else None,
            dec_rows=t_dec_rows if dec_rows else None,
            dec_lengths=t_lens if dec_lens else None,
            prefills=prefills,
            dec_dense=dense,
        )
        ctx = AdapterContext.from_row_slots(
            slots, dev, batch.merged_slot, self.lora_path, attention=meta, slots_tensor=t_slots
        )
        self.wrapped.holder.set(ctx)
        input_ids = t_ids[None, :]  # [1, T]
        inputs: dict[str, torch.Tensor] = {"input_ids": input_ids}
        if virtual:
            # Only while a prompt-tuned request is prefilled: embed here and put its virtual rows in.
            embeds = self.model.get_input_embeddings()(input_ids)  # [1, T, hidden]
            for start, rows_ in virtual:
                embeds[0, start : start + rows_.shape[0]] = rows_
            inputs = {"inputs_embeds": embeds}
        try:
            out = self.model(
                **inputs,
                position_ids=t_pos[None, :],
                use_cache=False,
                logits_to_keep=t_last,
            )
        finally:
            self.wrapped.holder.set(None)
        self.layers_attended = meta.layers
        return out.logits[0].float()  # [len(reqs), vocab]

    @staticmethod
    def commit(r: Request) -> None:
        """Record that the last forward's K/V of `r` are in the cache; called once its next token is drawn.

        `run` itself moves no request's state, so a batch that fails (in the forward or in
        sampling) can be re-run as it was."""
        r.num_computed = r.seq_len

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

    def virtual_tokens(self, slot: int) -> int:
        """Positions the soft prompt in `slot` takes in front of a prompt (0: none there)."""
        sp = self.wrapped.soft_prompts.get(slot)
        return sp.num_virtual if sp is not None else 0

    def _place_soft_prompt(
        self, r: Request, start: int, ids: list[int], virtual: list[tuple[int, torch.Tensor]]
    ) -> None:
        """At a soft-prompted request's first prefill: its virtual rows (prompt) or its KV prefix (prefix)."""
        sp = self.wrapped.soft_prompts.get(r.adapter_slot)
        if sp is None or sp.num_virtual != r.num_virtual:
            raise RuntimeError(f"request {r.request_id}: its slot {r.adapter_slot} lost its soft prompt")
        if sp.embeddings is not None:
            rows_ = sp.embeddings[r.num_computed :]  # [n, hidden]
            virtual.append((start, rows_))
            ids.extend([0] * rows_.shape[0])  # placeholders: these rows' embeddings are replaced
            return
        # prefix: [layers, 2, kv_heads, P, head_dim] into cache positions 0..P-1 of every layer; the
        # prompt is then prefilled as context P, at positions P.. (as PEFT's forward places it).
        p = sp.num_virtual
        for layer in range(sp.prefix.shape[0]):
            kv = sp.prefix[layer]  # [2, kv_heads, P, head_dim]
            k_cache, v_cache = self.cache.layer(layer, kv[0:1])
            if k_cache.shape[1] != kv.shape[1] or k_cache.shape[3] != kv.shape[3] or k_cache.dtype != kv.dtype:
                raise RuntimeError(f"layer {layer}: prefix {tuple(kv.shape)} does not fit the KV cache")
            k_cache[r.kv_slot, :, :p] = kv[0]
            v_cache[r.kv_slot, :, :p] = kv[1]
        r.num_computed = p


def _mask_lengths(lengths: list[int], rows: list[int] | None) -> list[int]:
    """The key length each decode-mask row sees (key j is visible when j < it).

    rows=None: one per sequence, its own length. rows given: one per cache row 0..max(rows)
    (the dense layout); rows without a sequence see every key (never an all-masked row).
    """
    if not lengths or rows is None:
        return lengths
    by_row = [max(lengths)] * (max(rows) + 1)
    for row, n in zip(rows, lengths):
        by_row[row] = n
    return by_row


def to_device(parts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Int lists as int64 tensors on `device`, through one host buffer and one copy.

    On CUDA the buffer is pinned and the copy asynchronous (non_blocking): the host goes on
    building the step while it runs, and no layer waits for it but on the device's own stream.
    """
    flat = [v for part in parts for v in part]
    host = torch.tensor(flat, dtype=torch.long)
    if device.type == "cuda":
        host = host.pin_memory()
        out = host.to(device, non_blocking=True)
    else:
        out = host
    return list(out.split([len(part) for part in parts]))
