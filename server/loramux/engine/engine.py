"""The engine: one loop on its own thread — schedule, run, post-process.

The gRPC handlers live on an asyncio loop; the engine runs off it, so the API
stays responsive while the model computes (torch releases the GIL). Requests come
in through `submit`, and each step's tokens go out through the request's `sink`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from loramux.config import EngineConfig, default_batch_tokens
from loramux.engine.detokenizer import Detokenizer
from loramux.engine.kv_blocks import BlockPool
from loramux.engine.kv_budget import plan_num_blocks
from loramux.engine.outcomes import Outcomes
from loramux.engine.prefix_cache import PrefixCache
from loramux.engine.request import FinishReason, InvalidParameter, Request, TokenEvent
from loramux.engine.runner import Batch, Runner
from loramux.engine.sampler import Sampler
from loramux.engine.scheduler import AdapterSlots, QueueFull, Scheduler
from loramux.engine.step_cost import StepCost
from loramux.model import BaseModel

log = logging.getLogger("loramux.engine")

__all__ = ["Draining", "Engine", "QueueFull"]


class Draining(RuntimeError):
    """The server is shutting down and admits nothing new (UNAVAILABLE)."""


class Engine:
    def __init__(
        self,
        base: BaseModel,
        wrapped: Any,
        config: EngineConfig,
        adapters: AdapterSlots | None = None,
        metrics: Any = None,
    ) -> None:
        config.validate()
        self.base = base
        self.config = config
        self.max_len = min(config.max_model_len or min(base.max_context, 4096), base.max_context)
        num_blocks = plan_num_blocks(
            base.model.config, base.dtype, base.device, kv_cache_mb=config.kv_cache_mb, block_size=config.block_size,
            max_len=self.max_len, max_running=config.max_running, merged_cache_mb=config.merged_cache_mb,
        )  # fmt: skip
        self.pool = BlockPool(num_blocks, config.block_size)
        self.batch_tokens = config.max_batch_tokens or default_batch_tokens(base.device.type)
        self.runner = Runner(
            wrapped, self.pool, config.lora_path, compile=config.compile, compile_merged=config.merged_cache_mb > 0
        )
        self.sampler = Sampler()
        self.scheduler = Scheduler(
            config, self.pool, adapters, max_len=self.max_len, batch_tokens=self.batch_tokens,
            prefix=PrefixCache(self.pool, enabled=config.prefix_caching), metrics=metrics,
            cost=StepCost.of_model(base.model, base.device.type),
        )  # fmt: skip
        self.scheduler.virtual_tokens = self.runner.virtual_tokens  # soft prompts count in budgets
        self.metrics = metrics
        self.eos = base.eos_token_ids
        self.vocab_size = int(base.model.get_output_embeddings().weight.shape[0])
        self._inbox: list[Request] = []
        self._calls: list[tuple[Callable[[], Any], Future]] = []
        self._cv = threading.Condition()
        self._stop = False
        self._admitting = True
        self._thread: threading.Thread | None = None
        self.steps = 0
        # Requests the server makes itself (the warm-up): run like any other, but
        # not counted in metrics or logged, so the counters equal client traffic.
        self.outcomes = Outcomes(base.tokenizer, self.sampler, metrics)
        self.quiet = self.outcomes.quiet

    def self_check(self) -> None:
        """Before SERVING: the engine's logits equal plain transformers' (self_check.py); raises ModelCheckFailed."""
        from loramux.engine.self_check import self_check

        if self._thread is not None:
            raise RuntimeError("the self-check runs before the engine starts")
        self_check(self.runner, self.runner.reference_impl, self.max_len, type(self.base.model).__name__)

    def compile(self) -> None:
        """Before SERVING: compile the decode step on the engine's pool (compiled.py); a no-op with --no-compile."""
        from loramux.engine.compiled import warm_up

        if self._thread is not None:
            raise RuntimeError("the decode step compiles before the engine starts")
        if self.runner.compiled is not None:
            warm_up(self.runner, self.max_len, self.config.max_running)
            if self.metrics is not None:  # served steps only: the warm-up's are not counted
                self.runner.compiled.observe = self.metrics.compiled_forward

    # --- API side (any thread) ---
    def validate(self, req: Request) -> None:
        """Check a request against the model and resolve defaults; ValueError says what is wrong."""
        req.params.validate()
        if not req.prompt_ids:
            raise InvalidParameter("prompt", "the prompt is empty")
        bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidParameter(
                "prompt", f"prompt_token_ids out of the vocabulary (size {self.vocab_size}): {bad[:5]}"
            )
        if req.params.max_new_tokens == 0:
            req.params.max_new_tokens = max(1, min(self.config.default_max_new_tokens, self.max_len - req.prompt_len))
        if req.prompt_len + req.params.max_new_tokens > self.max_len:
            raise InvalidParameter(
                "max_new_tokens",
                f"prompt ({req.prompt_len} tokens) + max_new_tokens ({req.params.max_new_tokens}) "
                f"exceeds the model's context of {self.max_len} tokens",
            )

    def submit(self, req: Request) -> None:
        """Queue a validated request. Raises QueueFull, or Draining once admission stopped."""
        req.detok = Detokenizer(self.base.tokenizer, req.params.stop)
        seed = req.params.seed if req.params.seed is not None else int.from_bytes(os.urandom(8), "little")
        req.seed = seed % 2**64
        with self._cv:
            if not self._admitting:
                raise Draining("the server is draining and admits no new requests")
            if len(self.scheduler.waiting) + len(self._inbox) >= self.config.max_queue:
                raise QueueFull(f"the queue is full ({self.config.max_queue} requests waiting)")
            self._inbox.append(req)
            self._cv.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two steps (adapter slots change only there)."""
        fut: Future = Future()
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                # Not started (tests, start-up): nothing else touches the slots yet.
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)
                return fut
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def stop_admitting(self) -> None:
        with self._cv:
            self._admitting = False

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    @property
    def idle(self) -> bool:
        return self.scheduler.idle and not self._inbox

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loramux-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- engine thread ---
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._inbox and not self._calls and self.scheduler.idle:
                    self._cv.wait()
                if self._stop:
                    break
                calls, self._calls = self._calls, []
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)
            with self._cv:  # after the calls: what arrived while one ran is scheduled at this step
                inbox, self._inbox = self._inbox, []
            for r in inbox:
                self.scheduler.waiting.append(r)
            try:
                did_work = self.step()
            except Exception:  # never let the loop die; step() already failed the batch
                log.exception("engine step failed")
                did_work = True
            if not did_work:
                with self._cv:
                    # Waiting only for adapters to load: sleep until woken or a short timeout.
                    if not self._inbox and not self._calls and not self._stop:
                        self._cv.wait(timeout=0.05)
        self.scheduler.reap(self.outcomes.dropped)
        for r in list(self.scheduler.running):  # cut short (drain timeout): counted and logged as errors
            self.scheduler.finish(r)
            self.outcomes.fail(r, RuntimeError("server shut down"))
        self.scheduler.fail_waiting(self.outcomes.fail)
        self._gauges()

    def step(self) -> bool:
        """One iteration. Returns False when there was nothing to run."""
        self.scheduler.reap(self.outcomes.dropped)
        batch = self.scheduler.schedule(self.outcomes.refused)
        self._gauges()
        if not batch.requests:
            return False
        phase = "prefill" if batch.prefill else "decode"
        t0 = time.perf_counter()
        try:
            partial, reqs, tokens, logprobs = self._run(batch)
        except Exception:
            log.exception("forward failed for %d requests; running them one by one", len(batch.requests))
            partial, reqs, tokens, logprobs = self._isolate(batch)
        if self.metrics is not None:
            self.metrics.forward(phase, time.perf_counter() - t0)
            if batch.merged_slot >= 0:
                self.metrics.merged_batch()
        self.steps += 1
        now = time.monotonic()
        # Only now, with every row's token drawn, does any request's state move on.
        for r in partial:  # a prompt chunk that does not end the prompt: its K/V positions only
            self._commit(r)
        for r, tok, lp in zip(reqs, tokens, logprobs):
            if tok is None:  # this row alone had non-finite logits: only its request fails
                log.error("request %s: the model's logits are not finite (NaN or inf)", r.request_id)
                self.scheduler.finish(r)
                self.outcomes.fail(r, RuntimeError("the model produced non-finite logits for this request"))
                continue
            self._commit(r)
            self._advance(r, tok, lp, now)
        # Again after the step: requests that finished in it leave the gauges now,
        # not at the next step (which never comes when the server goes idle).
        self._gauges()
        return True

    def _run(self, batch: Batch) -> tuple[list[Request], list[Request], list[int | None], list[float | None]]:
        """One forward, then a token for every request whose sequence it computes to the end.

        Returns (the requests in the middle of a chunked prefill, the requests sampled, their
        tokens, their logprobs). A prompt chunk that does not end its prompt gets no token: its
        row is not given to the sampler, so it draws nothing and its penalty state is not
        touched. Nothing about any request moves here (the caller commits), so a batch that
        fails in the forward or in sampling can be re-run as it was.
        """
        logits = self.runner.run(batch)  # [len(batch.requests), vocab]
        rs = batch.requests
        done = [i for i, r in enumerate(rs) if r.num_computed + r.num_scheduled == r.seq_len]
        partial = [r for r in rs if r.num_computed + r.num_scheduled < r.seq_len]
        reqs = [rs[i] for i in done]
        if not reqs:
            return partial, [], [], []
        out = self.sampler.sample(logits[done] if len(done) < len(rs) else logits, reqs)
        return partial, reqs, out.tokens, out.logprobs

    def _commit(self, r: Request) -> None:
        """The forward's K/V of `r` are in its blocks: advance it, and address its newly full blocks."""
        before = r.num_computed
        self.runner.commit(r)
        self.scheduler.computed(r, before)

    def _isolate(self, batch: Batch) -> tuple[list[Request], list[Request], list[int | None], list[float | None]]:
        """After a failed forward: run each request alone, so only the one that fails gets INTERNAL.

        Safe to repeat: no request's state (`num_computed`, its tokens) moves until its token is
        drawn, re-running writes the same K/V to the same slots of its blocks, and the sampler's
        draw depends only on the request (sampler.py), so the re-run draws the same token.
        """
        partial: list[Request] = []
        ok: list[Request] = []
        tokens: list[int | None] = []
        logprobs: list[float | None] = []
        for r in batch.requests:
            alone = Batch(
                prefill=[r] if r in batch.prefill else [],
                decode=[] if r in batch.prefill else [r],
                merged_slot=batch.merged_slot if r.adapter_slot == batch.merged_slot else -1,
            )
            try:
                part, done, tok, lp = self._run(alone)
            except Exception as e:
                log.exception("request %s failed in the forward", r.request_id)
                self.scheduler.finish(r)
                self.outcomes.fail(r, e)
                continue
            partial.extend(part)
            ok.extend(done)
            tokens.extend(tok)
            logprobs.extend(lp)
        return partial, ok, tokens, logprobs

    def _advance(self, r: Request, tok: int, lp: float | None, now: float) -> None:
        if r.first_token_at is None:
            r.first_token_at = now
        elif self.metrics is not None and r.last_token_at is not None and r not in self.quiet:
            self.metrics.token_latency(now - r.last_token_at)
        r.last_token_at = now
        r.output_ids.append(tok)
        r.detok.add(tok)
        finish = FinishReason.UNSPECIFIED
        if tok in self.eos and not r.params.ignore_eos:
            finish = FinishReason.EOS
        elif r.detok.stopped:
            finish = FinishReason.STOP
        elif len(r.output_ids) >= r.params.max_new_tokens or r.seq_len >= self.max_len:
            finish = FinishReason.LENGTH
        final = finish != FinishReason.UNSPECIFIED
        text = r.detok.release(final)
        if final:
            r.finish_reason = finish
            self.scheduler.finish(r)
            self.outcomes.record(r, "ok")
        self.outcomes.emit(r, TokenEvent([tok], text, [lp] if lp is not None else [], finish))

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_running(len(self.scheduler.running))
            self.metrics.set_waiting(len(self.scheduler.waiting) + len(self._inbox))
            self.metrics.set_kv_blocks(self.pool.num_used, self.pool.num_cached, self.pool.num_blocks)
