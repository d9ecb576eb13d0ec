"""The baselines, run in the bench's own process on the same model and the same requests.

- `transformers` static batching of the base model: batches of `batch_size` in
  arrival order, left-padded; a batch runs until its longest request is done.
- PEFT `generate(adapter_names=...)`: the same static batches, each row under its
  own adapter (PEFT's mixed-batch inference).
- PEFT's per-request `set_adapter` loop: one request at a time.

Only the tokens a request asked for count towards throughput: the steps a short
request spends waiting for its batch's longest one are the cost of static batching.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from loramux.bench.result import RunResult
from loramux.bench.workload import BenchRequest, static_batches
from loramux.model import resolve_device, resolve_dtype

PAD_ID = 0
PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


class StepClock(LogitsProcessor):
    """Called once per generated token (after that step's forward): when each step's token was ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


class Baselines:
    def __init__(
        self, model_dir: Path, device: str = "auto", dtype: str = "auto", peft_adapters: dict[str, Path] | None = None
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.peft_adapters = dict(peft_adapters or {})
        self._base: PreTrainedModel | None = None
        self._peft = None

    def _load(self) -> PreTrainedModel:
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype, local_files_only=True)
        model = model.to(self.device).eval()
        model.requires_grad_(False)
        model.generation_config.pad_token_id = PAD_ID
        return model

    @property
    def base(self) -> PreTrainedModel:
        if self._base is None:
            self._base = self._load()
        return self._base

    @property
    def peft(self):  # noqa: ANN201 (a PeftModel; peft is imported only when a PEFT baseline runs)
        if self._peft is None:
            from peft import PeftModel

            if not self.peft_adapters:
                raise ValueError("the PEFT baselines need at least one LoRA adapter")
            # A model of its own: PEFT wraps modules in place, and the plain baseline must stay plain.
            items = iter(self.peft_adapters.items())
            first_id, first_dir = next(items)
            model = PeftModel.from_pretrained(self._load(), str(first_dir), adapter_name=first_id, is_trainable=False)
            for adapter_id, path in items:
                model.load_adapter(str(path), adapter_name=adapter_id, is_trainable=False)
            self._peft = model.eval()
        return self._peft

    # --- the three baselines ---
    def hf_static(self, config: str, requests: list[BenchRequest], batch_size: int = 16) -> RunResult:
        if any(r.adapter_id for r in requests):
            raise ValueError("transformers static batching runs the base model: requests must name no adapter")
        return self._batches(config, self.base, static_batches(requests, batch_size), mixed=False)

    def peft_mixed(self, config: str, requests: list[BenchRequest], batch_size: int = 16) -> RunResult:
        return self._batches(config, self.peft, static_batches(requests, batch_size), mixed=True)

    def peft_loop(self, config: str, requests: list[BenchRequest]) -> RunResult:
        model = self.peft
        result = RunResult(config=config, requests=len(requests))
        start = time.perf_counter()
        for r in requests:
            if r.adapter_id:
                model.set_adapter(r.adapter_id)
                ctx = contextlib.nullcontext()
            else:
                ctx = model.disable_adapter()
            with ctx:
                self._generate(model, [r], start, result)
        result.wall_s = time.perf_counter() - start
        return result

    # --- helpers ---
    def _batches(self, config: str, model, batches: list[list[BenchRequest]], mixed: bool) -> RunResult:
        result = RunResult(config=config, requests=sum(len(b) for b in batches))
        start = time.perf_counter()
        for batch in batches:
            kwargs = {"adapter_names": [r.adapter_id or PEFT_BASE for r in batch]} if mixed else {}
            self._generate(model, batch, start, result, **kwargs)
        result.wall_s = time.perf_counter() - start
        return result

    @torch.inference_mode()
    def _generate(self, model, batch: list[BenchRequest], start: float, result: RunResult, **kwargs: object) -> None:
        width = max(len(r.prompt_ids) for r in batch)
        steps = max(r.max_new_tokens for r in batch)
        ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every row's last prompt token lines up
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        clock = StepClock()
        model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=PAD_ID,
            logits_processor=LogitsProcessorList([clock]),
            **kwargs,
        )
        t = clock.times
        for r in batch:
            n = min(r.max_new_tokens, len(t))
            result.tokens += n
            result.ttft_s.append(t[0] - start)  # every request of an offline run arrives at the start
            result.itl_s.extend(t[j] - t[j - 1] for j in range(1, n))
