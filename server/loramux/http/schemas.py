"""Request bodies of the OpenAI-compatible API, validated by pydantic (FastAPI does it on arrival).

The fields are OpenAI's, plus the sampling extras vLLM accepts (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`). Unknown fields are ignored, as OpenAI-style
servers do, so tools that send more than we use keep working; fields we know but
cannot honour (`echo`, `suffix`, `logit_bias`, `tools`, `best_of` > `n`) are refused
with a 400 rather than silently dropped. Range checks are the engine's
(`SamplingParams.validate`: temperature, top_p, top_k, min_p and the three penalties),
so both APIs refuse the same values with the same message; the error names the
parameter (`param`). Only an exact 0 for `top_p` or `repetition_penalty` is refused
here: the contract's message reads 0 as "unset", and an OpenAI client that sends it
means something else.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one completions call
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for the completions API's `logprobs`
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat's `top_logprobs`

# The engine returns the sampled token's log-probability, not the most likely alternatives.
TOP_ALTERNATIVES = "log-probabilities of alternative tokens are not supported; ask for 0 (the sampled token's only)"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: float | None = None  # None = OpenAI's default, 1.0
    top_p: float | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling parameters
    top_k: int | None = None  # None, 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is not None and v < -1:
            raise ValueError("top_k must be -1 or 0 (off), or a positive number of tokens")
        return v

    @field_validator("top_p", "repetition_penalty")
    @classmethod
    def _not_zero(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v == 0:
            what = "in (0, 1]" if info.field_name == "top_p" else "> 0 (1 = off)"
            raise ValueError(f"{info.field_name} must be {what}, got 0 (use temperature 0 for greedy)")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v < 2**64:
            raise ValueError("seed must be in [0, 2**64)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.logprobs:
            raise ValueError(TOP_ALTERNATIVES)
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError("prompt is an empty list")
            if len(self.prompt) > MAX_PROMPTS and not isinstance(self.prompt[0], int):
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the call: a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.top_logprobs:
            raise ValueError(TOP_ALTERNATIVES)
        return self

    @property
    def max_new_tokens(self) -> int:
        """0 = the server's default."""
        return self.max_completion_tokens or self.max_tokens or 0


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_int_id: int | None = None
