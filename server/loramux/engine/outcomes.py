"""How a request ends: the one place a finished request is counted, logged and told.

Every end goes through here: a last token (`record(r, "ok")` then `emit`), a failure
(`fail`), a refusal at admission (`refused`: counted as rejected by reason), a cancel or a
passed deadline (`dropped`). Requests in `quiet` (the server's own warm-up) are told but
neither counted nor logged, so the counters equal client traffic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from loramux.engine.request import Request, TokenEvent
from loramux.engine.sampler import Sampler
from loramux.logs import log_request, prompts_logged

log = logging.getLogger("loramux.engine")


class Outcomes:
    def __init__(self, tokenizer: Any, sampler: Sampler, metrics: Any = None) -> None:
        self.tokenizer, self.sampler, self.metrics = tokenizer, sampler, metrics
        self.quiet: set[Request] = set()
        # Why a request refused at admission was refused (the API's status name, lower case:
        # "not_found", ...); "internal" for a failure that is not a refusal. The server sets it.
        self.refusal_reason: Callable[[BaseException], str] = lambda err: "internal"

    def emit(self, r: Request, ev: TokenEvent) -> None:
        try:
            r.sink(ev)
        except Exception:  # a sink whose client went away must not hurt the batch
            log.exception("sink of request %s failed", r.request_id)

    def fail(self, r: Request, err: BaseException) -> None:
        self.record(r, "error")
        self.emit(r, TokenEvent([], "", [], error=err))

    def refused(self, r: Request, err: BaseException) -> None:
        """A waiting request the scheduler could not admit (its adapter was deleted or is bad,
        every slot is pinned, too long with its soft prompt): counted as rejected, by reason."""
        reason = self.refusal_reason(err)
        if reason == "internal":
            self.fail(r, err)
            return
        self.record(r, "rejected", reason)
        self.emit(r, TokenEvent([], "", [], error=err))

    def dropped(self, r: Request, why: str) -> None:
        self.record(r, why)
        self.emit(r, TokenEvent([], "", [], cancelled=True))

    def record(self, r: Request, status: str, reason: str = "") -> None:
        """The one place a finished request is counted and logged (and its sampling state freed)."""
        self.sampler.release(r)
        if r in self.quiet:
            self.quiet.discard(r)
            return
        end = time.monotonic()
        queue_s = (r.first_scheduled or end) - r.arrival
        ttft = (r.first_token_at - r.arrival) if r.first_token_at is not None else None
        record = {
            "request_id": r.request_id,
            "adapter_id": r.adapter_id,
            "status": status,
            "finish_reason": r.finish_reason.name.lower(),
            "prompt_tokens": r.prompt_len,
            "generated_tokens": len(r.output_ids),
            "queue_s": queue_s,
            "ttft_s": ttft,
            "total_s": end - r.arrival,
            "frontend": r.frontend,
        }
        if reason:
            record["code"] = reason.upper()
        if prompts_logged():  # --log-prompts: decoded only then, so the default costs nothing
            record["prompt"] = self.tokenizer.decode(r.prompt_ids)
        log_request(record)
        if self.metrics is not None and status == "rejected":
            self.metrics.request_rejected(reason, frontend=r.frontend)
        elif self.metrics is not None:
            self.metrics.request_finished(
                status,
                r.prompt_len,
                len(r.output_ids),
                queue_s,
                ttft,
                end - r.arrival,
                r.adapter_id or None,
                frontend=r.frontend,
            )
