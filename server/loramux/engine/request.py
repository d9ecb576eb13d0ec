"""The request: the one message between the API, the scheduler and the runner."""

from __future__ import annotations

import enum
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class FinishReason(enum.IntEnum):
    # Values equal the proto enum's, so the API maps them 1:1.
    UNSPECIFIED = 0
    LENGTH = 1
    EOS = 2
    STOP = 3


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SamplingParams:
    max_new_tokens: int = 0  # 0 = server default, resolved at submit
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_p: float = 0.0  # 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def validate(self) -> None:
        """Raise InvalidParameter (a ValueError) with a message that names the bad parameter.

        The one check of sampling values: the gRPC and the HTTP API both reach it (api/requests.py).
        NaN fails every range check below (each is written so that a NaN is out of range),
        so no NaN or infinity is ever taken as "off".
        """
        if self.max_new_tokens < 0:
            raise InvalidParameter("max_new_tokens", "max_new_tokens must be >= 0")
        _in_range("temperature", self.temperature, 0.0, math.inf, "a finite number >= 0 (0 = greedy)")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidParameter("top_p", f"top_p must be in (0, 1] (0 or unset = off), got {self.top_p}")
        if self.top_k < 0:
            raise InvalidParameter("top_k", f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidParameter(
                "repetition_penalty",
                f"repetition_penalty must be a finite number > 0 (0 or unset = off), got {self.repetition_penalty}",
            )
        _in_range("min_p", self.min_p, 0.0, 1.0, "in [0, 1] (0 = off)")
        _in_range("presence_penalty", self.presence_penalty, -2.0, 2.0, "in [-2, 2]")
        _in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "in [-2, 2]")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise InvalidParameter("stop", "stop: at most 16 non-empty strings of at most 256 characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class InvalidParameter(ValueError):
    """A request parameter out of its range; `param` is its SamplingParams field name (or `prompt`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _in_range(name: str, value: float, lo: float, hi: float, what: str) -> None:
    if not (math.isfinite(value) and lo <= value <= hi):
        raise InvalidParameter(name, f"{name} must be {what}, got {value}")


@dataclass
class TokenEvent:
    """What the engine tells the API after a step: new tokens and text, and maybe the end."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    error: BaseException | None = None  # set when the request failed inside the engine
    cancelled: bool = False

    @property
    def final(self) -> bool:
        return self.finish_reason != FinishReason.UNSPECIFIED or self.error is not None or self.cancelled


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter_id: str = ""  # "" = base model
    return_logprobs: bool = False
    deadline: float | None = None  # time.monotonic() after which it is abandoned
    frontend: str = "grpc"  # the API it came through (grpc, http): a metrics label and a log field
    # Called from the engine thread with each step's TokenEvent.
    sink: Callable[[TokenEvent], None] = lambda ev: None

    # --- engine-owned state ---
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    # KV blocks it holds while running (kv_blocks.py): position p is in block_table[p // block_size]
    block_table: list[int] = field(default_factory=list)
    # its prefix hash chain: [0] the root, [i + 1] block i's hash (prefix_cache.py); kept across preemptions
    block_hashes: list[bytes] = field(default_factory=list)
    num_scheduled: int = 0  # positions this step's forward computes for it (a chunk of its prefill, or 1)
    cached_tokens: int = -1  # prompt tokens served from the prefix cache at its first admission (-1: not yet)
    adapter_slot: int = -1  # device slot of its adapter (-1 = base model)
    adapter_handle: Any = None  # the adapter cache's lease, released when the request ends
    # Soft-prompt positions in front of the prompt in its KV blocks (virtual tokens or a KV prefix of its
    # adapter), set when its adapter slot is leased: its positions are [virtual][prompt][output].
    num_virtual: int = 0
    num_computed: int = 0  # positions whose K/V are in its blocks (virtual ones included)
    detok: Any = None  # the request's incremental detokenizer
    seed: int = 0  # the sampler's random stream (sampler.py): params.seed, or a random one at submission
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def seq_len(self) -> int:
        """Positions the request takes in its KV blocks: virtual + prompt + output."""
        return self.num_virtual + len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids_from(self, index: int) -> list[int]:
        """prompt + output tokens from `index` on, without copying the whole sequence (a decode needs one)."""
        if index >= len(self.prompt_ids):
            return self.output_ids[index - len(self.prompt_ids) :]
        return self.prompt_ids[index:] + self.output_ids

    def cancel(self) -> None:
        """Thread-safe: the engine frees the request at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline
