"""The runner: turns a scheduled batch into tensors, sets the one per-forward context, runs the model."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from loramux.engine import attention
from loramux.engine.attention import AttentionMeta, PrefillSeq
from loramux.engine.compiled import MIN_BLOCKS, CompiledDecode
from loramux.engine.forward_context import BASE_SLOT, AdapterContext, row_segments, to_device
from loramux.engine.kv_blocks import BlockPool
from loramux.engine.paged_attention import kernel_for
from loramux.engine.request import Request

if TYPE_CHECKING:
    from loramux.adapters.model.wrapped import WrappedModel


@dataclass
class Batch:
    """One forward's worth of work: prefill chunks (or recomputes) and decodes, each with its `num_scheduled`."""

    prefill: list[Request]
    decode: list[Request]
    merged_slot: int = -1
    # run merged_slot's rows in a forward of their own, the other rows in a second one (adapters/cache/merge_policy.py)
    split_merged: bool = False
    # the compiled graphs' warm-up (engine/compiled.py) runs base rows through another graph's path:
    # "merged" (W0 as every merged weight, before any adapter is merged) or "adapters" (the opaque
    # adapter operator, before any adapter is loaded); "" for every served step
    warm_graph: str = ""

    @property
    def requests(self) -> list[Request]:
        return self.prefill + self.decode


class Runner:
    def __init__(
        self,
        wrapped: WrappedModel,
        pool: BlockPool,
        lora_path: str = "auto",
        compile: bool = False,
        compile_merged: bool = False,
    ) -> None:
        self.wrapped = wrapped
        self.lora_path = lora_path  # forward_context.LORA_PATHS
        self.model = wrapped.model
        self.pool = pool
        self.device = wrapped.device
        # transformers' own attention implementation, before loramux's replaces it (the self-check's reference)
        self.reference_impl: str = self.model.config._attn_implementation or "eager"
        self.kernel = kernel_for(self.device)
        attention.register()
        self.model.set_attn_implementation(attention.ATTN_IMPL)
        # attention reads its metadata from the one per-forward context, as the wrapped layers do
        attention.attach(self.model, wrapped.holder)
        # the layers whose attention ran in the last forward (the self-check reads it)
        self.layers_attended: set[int] = set()
        # the compiled decode step (compiled.py), for decode steps of base rows (and of all-merged rows)
        self.compiled: CompiledDecode | None = CompiledDecode(self.model, compile_merged) if compile else None

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Run one forward; returns the logits after each request's last new position, in `batch.requests` order.

        Each request computes its positions `num_computed .. num_computed + num_scheduled`
        into the blocks of its table (the scheduler allocated them). `run` itself moves no
        request's state (`commit` does, once the step's tokens are drawn), so a batch that
        fails in the forward or in sampling can be re-run as it was.
        logits: [len(batch.requests), vocab], float32.
        """
        return self._run_split(batch) if batch.split_merged else self._forward(batch)

    def schedule_rest(self, r: Request) -> None:
        """Schedule every position of `r` not yet computed, with blocks for them from this runner's pool:
        what the scheduler does, for the forwards run before serving (self_check.py, compiled.py)."""
        r.num_scheduled = r.seq_len - r.num_computed
        while self.pool.block_size * len(r.block_table) < r.seq_len:
            r.block_table.append(self.pool.allocate())

    @staticmethod
    def commit(r: Request) -> None:
        """Record that the last forward's K/V of `r` are in its blocks; called once the step's tokens are drawn.

        A prompt chunk that does not end the prompt commits its positions only (it drew no token)."""
        r.num_computed += r.num_scheduled
        r.num_scheduled = 0

    def _forward(self, batch: Batch) -> torch.Tensor:
        reqs = batch.requests
        bs = self.pool.block_size
        # Rows are grouped by adapter slot so each adapter is one contiguous segment;
        # within a request its tokens stay contiguous and in order.
        # The merged slot's rows go last, so the rows that undo its delta form one span (adapters/model/linear.py).
        m = batch.merged_slot
        order = sorted(range(len(reqs)), key=lambda i: (m >= 0 and reqs[i].adapter_slot == m, reqs[i].adapter_slot))
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        row_slots: list[int] = []
        last_token = [0] * len(reqs)
        dec_tokens: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        # (flat start, length, context, its block table) of each prefill chunk
        chunks: list[tuple[int, int, int, list[int]]] = []
        # (flat row of the first virtual token, its embeddings [n, hidden]) of prompt-tuned prefills
        virtual: list[tuple[int, torch.Tensor]] = []
        # (request, first position) of KV prefixes to copy in, and the slots they go to
        prefixes: list[tuple[Request, int]] = []
        prefix_slots: list[int] = []
        for i in order:
            r = reqs[i]
            end = r.num_computed + r.num_scheduled
            if r.num_scheduled < 1 or bs * len(r.block_table) < end:
                raise RuntimeError(f"request {r.request_id}: positions up to {end} do not fit its blocks")
            start = len(ids)
            first = r.num_computed  # first position this forward computes
            table = r.block_table
            if first < r.num_virtual:
                first = self._place_soft_prompt(r, start, ids, virtual)
                if first > r.num_computed:  # a KV prefix: its positions are copied in, not computed
                    prefixes.append((r, r.num_computed))
                    prefix_slots.extend(table[q // bs] * bs + q % bs for q in range(r.num_computed, first))
            # Positions are [virtual][prompt][output]: position p >= num_virtual is all_ids[p - num_virtual].
            nv = r.num_virtual
            ids.extend(r.ids_from(max(first, nv) - nv)[: end - max(first, nv)])
            n = len(ids) - start
            pos.extend(range(first, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(first, end))
            row_slots.extend([r.adapter_slot] * n)
            last_token[i] = len(ids) - 1
            if n == 1:
                dec_tokens.append(start)
                dec_tables.append(table[: self.pool.blocks_for(end)])
                dec_lens.append(end)
            else:
                chunks.append((start, n, first, table[: self.pool.blocks_for(end)]))

        dev = self.device
        compiled = self.compiled if self.compiled is not None and self.compiled.enabled else None
        # A step a compiled graph serves: decodes only, and every row on the base model; or every row
        # on the merged slot with every layer merged (those layers' weights then go in the context);
        # or any other mix of slots, each wrapped layer one opaque call (adapters/model/adapter_op.py).
        merged_weights = None
        opaque = False
        use_compiled = compiled is not None and not chunks
        if use_compiled:
            warm = batch.warm_graph
            # a resident bottleneck adapter's hooks are read by the base and merged graphs: adapter graph
            plain = not self.wrapped.has_bottleneck()
            base_only = plain and m == BASE_SLOT and all(s == BASE_SLOT for s in row_slots)
            if warm == "merged" or (plain and m != BASE_SLOT and all(s == m for s in row_slots)):
                merged_weights = self.wrapped.merged_weights(m) if compiled.merged else None
            if merged_weights is None and (warm == "adapters" or not base_only):
                opaque = compiled.adapters
            use_compiled = merged_weights is not None or opaque or (base_only and not warm)
        nb = max((len(t) for t in dec_tables), default=0)
        if use_compiled:
            nb = max(nb, MIN_BLOCKS)
        padded = [b for t in dec_tables for b in t + [0] * (nb - len(t))]  # padding is masked out
        chunk_tables = [b for c in chunks for b in c[3]]
        # The adapter context first: batched LoRA plans its gather / segment indices from it (once per
        # stack layout), so that every index tensor of this forward is in one host buffer and one copy.
        ctx = AdapterContext(None, row_segments(row_slots), batch.merged_slot, self.lora_path)
        lora = self.wrapped.prepare_lora(ctx)
        dirty = self.pool.take_dirty()  # blocks handed out again: zeroed before this forward writes
        parts = [ids, pos, slots, row_slots, last_token, dec_tokens, padded, dec_lens, chunk_tables, prefix_slots]
        t = to_device([*parts, dirty, *lora.lists], dev)
        t_ids, t_pos, t_slots, t_row_slots, t_last, t_dec_tokens, t_tables, t_lens, t_chunks, t_prefix = t[: len(parts)]
        lora.bind(t[len(parts) + 1 :])
        if dirty:
            self.pool.zero(t[len(parts)])
        tabs = t_chunks.split([len(c[3]) for c in chunks]) if chunks else []
        prefills = [PrefillSeq(start, n, context, tab) for (start, n, context, _), tab in zip(chunks, tabs)]
        if prefixes:
            self._copy_prefixes(prefixes, t_prefix)
        meta = AttentionMeta(
            pool=self.pool,
            kernel=self.kernel,
            slots=t_slots,
            dec_tokens=t_dec_tokens if dec_tokens else None,
            dec_tables=t_tables.view(len(dec_tables), nb) if dec_tables else None,  # [B, nb]
            dec_lengths=t_lens if dec_lens else None,
            prefills=prefills,
        )
        if opaque:  # the adapter graph multiplies by each layer's weight for this step, then adds the deltas
            merged_weights = self.wrapped.step_weights(ctx)
        ctx.slots, ctx.attention, ctx.merged_weights, ctx.opaque_adapters = t_row_slots, meta, merged_weights, opaque
        self.wrapped.holder.set(ctx)
        input_ids = t_ids[None, :]  # [1, T]
        inputs: dict[str, torch.Tensor] = {"input_ids": input_ids}
        if virtual:
            # Only while a prompt-tuned request is prefilled: embed here and put its virtual rows in.
            embeds = self.model.get_input_embeddings()(input_ids)  # [1, T, hidden]
            for start, rows_ in virtual:
                embeds[0, start : start + rows_.shape[0]] = rows_
            inputs = {"inputs_embeds": embeds}
        kwargs = dict(inputs, position_ids=t_pos[None, :], use_cache=False, logits_to_keep=t_last)
        try:
            out = None
            if use_compiled:
                rows = [(input_ids, 1), (kwargs["position_ids"], 1), (t_slots, 0), (t_row_slots, 0), (t_last, 0),
                        (t_dec_tokens, 0), (meta.dec_tables, 0), (t_lens, 0)]  # fmt: skip
                out = compiled(rows, [(meta.dec_tables, 1)], **kwargs)
            if out is None:
                out = self.model(**kwargs)
        finally:
            self.wrapped.holder.set(None)
        self.layers_attended = meta.layers
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
            logits = self._forward(sub)  # [len(sub.requests), vocab]
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
    ) -> int:
        """Its virtual rows (prompt) or its KV prefix (prefix) from `r.num_computed` on.

        Returns the first position the forward itself computes: `r.num_computed` for virtual
        rows (they are rows of the forward), the prefix length for a KV prefix (`_copy_prefixes`
        puts it in once the forward's indices are on the device).
        """
        sp = self.wrapped.soft_prompts.get(r.adapter_slot)
        if sp is None or sp.num_virtual != r.num_virtual:
            raise RuntimeError(f"request {r.request_id}: its slot {r.adapter_slot} lost its soft prompt")
        c = r.num_computed
        if sp.embeddings is not None:
            rows_ = sp.embeddings[c:]  # [n, hidden]
            virtual.append((start, rows_))
            ids.extend([0] * rows_.shape[0])  # placeholders: these rows' embeddings are replaced
            return c
        return sp.num_virtual

    def _copy_prefixes(self, prefixes: list[tuple[Request, int]], slots: torch.Tensor) -> None:
        """KV prefixes into their slots: request r's positions c..P-1 of every layer, `slots` [sum of P - c].

        prefix: [layers, 2, kv_heads, P, head_dim]; the prompt is then computed with context P,
        at positions P.. (as PEFT's forward places it).
        """
        at = 0
        for r, c in prefixes:
            sp = self.wrapped.soft_prompts[r.adapter_slot]
            p = sp.num_virtual
            where = slots[at : at + p - c]  # [P - c]
            at += p - c
            for layer in range(sp.prefix.shape[0]):
                kv = sp.prefix[layer]  # [2, kv_heads, P, head_dim]
                k_cache, v_cache = self.pool.layer(layer, kv[0:1])  # [N, bs, kv_heads, d]
                if k_cache.shape[2] != kv.shape[1] or k_cache.shape[3] != kv.shape[3] or k_cache.dtype != kv.dtype:
                    raise RuntimeError(f"layer {layer}: prefix {tuple(kv.shape)} does not fit the KV cache")
                k_cache.view(-1, *k_cache.shape[2:])[where] = kv[0, :, c:].transpose(0, 1)
                v_cache.view(-1, *v_cache.shape[2:])[where] = kv[1, :, c:].transpose(0, 1)
