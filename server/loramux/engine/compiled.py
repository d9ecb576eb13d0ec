"""The compiled decode step: the model's forward under `torch.compile`, for every decode-only step.

Why it can. Dynamo specialises a compiled graph on every Python value the forward reads,
and guards on them. Three kinds of decode step read the same Python structure every step
and differ only in tensor sizes (B rows, each table nb blocks long):

- base: every row on the base model (one base segment, no merged slot);
- all-merged: every row on one merged adapter, each wrapped layer's weight (its merged
  copy, or W0) taken from the forward context by layer index, whatever adapter it is;
- adapters: any other mix of slots. Here each wrapped layer is one opaque custom operator
  (adapters/model/adapter_op.py) whose body runs the layer's eager forward: the segments,
  stacks and plans it reads never reach dynamo.

Those two sizes are marked dynamic, the row count B within a range (`row_ranges`): B = 1
gets a graph of its own (dynamo specialises sizes 0 and 1 wherever they occur); on CPU
2 <= B <= SMALL_ROWS another and B > SMALL_ROWS a third, on CUDA one for every B >= 2.
Each serves every table length nb >= 2 (the runner pads every decode table to at least
`MIN_BLOCKS` blocks; padding is masked). On CPU the matrix products of the graphs of at
most SMALL_ROWS rows read each weight row once for all B rows (engine/products.py): with
few rows a product is bound by reading the weights, which ATen's `mm` does slowly; past
SMALL_ROWS the two measured alike, and the third graph keeps `mm`.
Steps with prompt chunks run eager, the reference path.

When. Every graph is compiled at start-up (`warm_up`, before the engine serves), on the
engine's own block pool, and each compiled result is compared with the eager forward of
the same batch; a mismatch beyond rounding turns compilation off for this engine with a
warning (eager is always correct). While serving, the stance is `fail_on_recompile`: a
step whose guards no compiled graph passes raises at entry instead of compiling, and
runs eager (`misses` counts them), so no request ever waits for a compilation.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch._dynamo.exc import RecompileError

log = logging.getLogger("loramux.compiled")

MIN_BLOCKS = 2  # decode tables are padded to at least this many blocks (a size of 1 would be specialised)


Dim = tuple[torch.Tensor, int]  # a tensor and one of its dims
SMALL_ROWS = 8  # decode steps of 2..SMALL_ROWS rows have a graph of their own (weight-stationary products on CPU)


def row_ranges(small_rows: bool) -> list[tuple[int, int | None]]:
    """The row counts each graph serves, (least, most or None): B = 1, then (on CPU, `small_rows`)
    2..SMALL_ROWS and the rest, or (on CUDA, where products are left as they are) every B >= 2."""
    return [(1, 1), (2, SMALL_ROWS), (SMALL_ROWS + 1, None)] if small_rows else [(1, 1), (2, None)]


def inductor_options(model: torch.nn.Module) -> dict[str, Any]:
    """Inductor options for this model's graphs: on CPU, the products of graphs of at most SMALL_ROWS
    rows (statically known) read each weight row once for every row (engine/products.py).

    A decode step of few rows is bound by reading the weights: ATen's `mm` reads them at a third to a
    half of the speed of a plain sum over them on the CPUs measured, the rewritten products at
    nine tenths (the 29 projections of the bench's model, 47 MB, one thread: `scripts/bench_gemv.py`).
    Graphs on CUDA are left as they are.
    """
    from loramux.engine.products import WeightStationaryProducts

    return {"post_grad_custom_pre_pass": WeightStationaryProducts(SMALL_ROWS)} if _on_cpu(model) else {}


def _on_cpu(model: torch.nn.Module) -> bool:
    return next(model.parameters()).device.type == "cpu"


@dataclass
class CompileReport:
    seconds: float = 0.0  # start-up time spent compiling (and checking) the graphs
    graphs: int = 0
    error: str = ""  # why compilation is off, if it was turned off at start-up


class CompiledDecode:
    """`torch.compile(model.forward)` plus the rules for when a forward may use it."""

    def __init__(self, model: torch.nn.Module, merged: bool = False) -> None:
        from loramux.adapters.model import adapter_op

        # dynamo keeps at most `recompile_limit` graphs per code object (8 by default) and past it runs
        # the frame eager without a word; every model instance in the process shares the model class's
        # code object (tests start several servers), and one engine compiles up to 6 graphs
        limit = {"recompile_limit": 64} if "recompile_limit" in inspect.signature(torch.compile).parameters else {}
        self.fn = torch.compile(model.forward, options=inductor_options(model), **limit)
        self.ranges = row_ranges(_on_cpu(model))  # the graphs' row ranges
        self.max_rows = 1 << 12  # the most rows a step can have (warm_up sets the engine's)
        self.merged = merged  # also the graphs of all-merged decode steps (the merged cache is on)
        self.adapters = adapter_op.available()  # also the graphs of adapter decode steps (adapter_op.py)
        self.enabled = True
        self.warming = False  # inside `warm_up`: the only time graphs compile
        self.serving = False  # set after the warm-up: from then on nothing compiles
        self.steps = 0  # decode steps run compiled
        self.misses = 0  # eligible steps no graph's guards passed (run eager)
        self.observe: Callable[[str], None] | None = None  # told "compiled" / "eager" per eligible step (metrics)
        self.report = CompileReport()

    def __call__(self, rows: list[Dim], blocks: list[Dim], **kwargs: Any) -> Any | None:
        """The model's output, or None when no compiled graph fits (the caller runs eager).

        rows / blocks: the forward's tensors and which of their dims is the step's row count (B) /
        its tables' length (nb). While graphs compile, B's dims are marked dynamic within its range
        (`row_ranges`) and nb's without bounds; a compiled graph's guards check the sizes without marks.
        """
        if self.warming:
            b = rows[0][0].shape[rows[0][1]] if rows else 1
            lo, hi = next((lo, hi) for lo, hi in self.ranges if b >= lo and (hi is None or b <= hi))
            for t, d in rows:
                if (lo, hi) == (2, None):  # the one graph of B >= 2 (CUDA): no bounds, as before ranges
                    torch._dynamo.mark_dynamic(t, d)
                elif lo > 1:  # bounds dynamo guards: the last range's is the engine's most rows (a min without
                    # a max fails in torch 2.13; and a guard a graph makes, such as 2·B < 32767 for some
                    # models, must hold over the whole range, or the compilation fails)
                    torch._dynamo.mark_dynamic(t, d, min=lo, max=hi or self.max_rows)
            for t, d in blocks:
                if t.shape[d] > 1:
                    torch._dynamo.mark_dynamic(t, d)
            # the context's tensors may first be reached through a module (a hook's bound method, as the
            # bottleneck points' are on GPT-2's ln_1): shapes dynamo reaches that way are static by
            # default, whatever their marks, and every step of another row count would miss its graph
            with torch._dynamo.config.patch(force_nn_module_property_static_shapes=False):
                return self.fn(**kwargs)
        if not self.serving:  # never warmed up (an engine driven directly, without its start-up)
            return None
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                out = self.fn(**kwargs)
        except (RecompileError, RuntimeError) as e:
            # torch raises a plain RuntimeError naming the stance when a frame's guards all fail
            if not isinstance(e, RecompileError) and "fail_on_recompile" not in str(e):
                raise
            self.misses += 1
            log.debug("no compiled graph fits this step, it runs eager: %s", e)
            if self.observe is not None:
                self.observe("eager")
            return None
        self.steps += 1
        if self.observe is not None:
            self.observe("compiled")
        return out

    def disable(self, why: str) -> None:
        self.enabled = False
        self.report.error = why
        log.warning("compiled decode is off: %s; every step runs eager", why)


def warm_up(runner: Any, max_len: int, max_rows: int) -> CompileReport:
    """Compile the decode graphs on the runner's own pool (a batch in each row range of `row_ranges`:
    B = 1, 3 and (on CPU) SMALL_ROWS + 1, those an engine of `max_rows` rows can run and the pool holds; base
    rows, then the same rows through the adapter operators, then all-merged with W0 standing for
    every merged weight when the merged cache is on) and check them against eager.

    Runs before the engine serves: its requests take blocks of the pool and give them all
    back. Sets `serving` once done, so that nothing compiles later; on any failure or
    mismatch compilation is turned off (`CompiledDecode.disable`), the engine serves eager.
    """
    from loramux.engine.request import Request, SamplingParams
    from loramux.engine.runner import Batch
    from loramux.engine.self_check import tolerance

    compiled: CompiledDecode = runner.compiled
    compiled.max_rows = max_rows
    pool = runner.pool
    t0 = time.perf_counter()
    kinds = [""] + ["adapters"] * compiled.adapters + ["merged"] * compiled.merged
    # a batch in each range: B = 3, not 2, in the small range, so that B and the tables' nb = 2 are not one size
    sizes = [3 if lo == 2 else lo for lo, _ in compiled.ranges if lo <= max_rows]  # 1, 3, SMALL_ROWS + 1
    decodes = len(kinds) * len(sizes)  # tokens the first request gains
    # prompts that fill more than MIN_BLOCKS - 1 blocks, so that the decodes' tables need no padding
    n = min(MIN_BLOCKS * pool.block_size - pool.block_size + 1, max_len - decodes)
    sizes = [b for b in sizes if b == 1 or pool.num_blocks >= b * pool.blocks_for(n + decodes)]
    prompts = [[3 + (7 * i + j) % 11 for j in range(n)] for i in range(max(sizes))]
    reqs = [Request(f"compile-{i}", p, SamplingParams()) for i, p in enumerate(prompts)]
    dtype = next(runner.model.parameters()).dtype
    compiled.warming = True
    try:
        runner.compiled = None  # the prompts run eager
        _run(runner, Batch(prefill=reqs, decode=[]))
        runner.compiled = compiled
        groups = [reqs[:b] for b in sizes]
        for warm, group in [(k, g) for k in kinds for g in groups]:
            got = _run(runner, Batch(prefill=[], decode=group, warm_graph=warm), commit=False)
            runner.compiled = None
            want = _run(runner, Batch(prefill=[], decode=group))
            runner.compiled = compiled
            err = float((got - want).abs().max())
            if not err <= tolerance(dtype) * max(float(want.abs().max()), 1.0):
                what = f"{warm} " if warm else ""
                compiled.disable(f"its {what}logits differ from eager by {err:.3g} ({len(group)} rows)")
                break
            compiled.report.graphs += 1
    except Exception as e:  # a model or backend inductor cannot compile: eager serves it
        compiled.disable(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
    finally:
        runner.compiled, compiled.warming = compiled, False
        for r in reqs:
            pool.release(r.block_table)
            r.block_table = []
    compiled.serving = True
    compiled.report.seconds = time.perf_counter() - t0
    if compiled.enabled:
        log.info("compiled decode ready: %d graphs in %.1f s", compiled.report.graphs, compiled.report.seconds)
    return compiled.report


def _run(runner: Any, batch: Any, commit: bool = True) -> torch.Tensor:
    """One forward of `batch` as the scheduler would set it up; returns its logits [rows, vocab]."""
    for r in batch.requests:
        runner.schedule_rest(r)
    logits = runner.run(batch)
    if commit:
        for r, row in zip(batch.requests, logits):
            runner.commit(r)
            r.output_ids.append(int(row.argmax()))
    return logits
