"""The compiled graphs' matrix products on CPU: a multiply and sum that reads each weight row once.

A decode step's projections multiply M rows (M = the running requests) by every weight
W [N, K] of the model. ATen's `mm` runs them through the BLAS, which on the CPUs measured
here reads the weights far below the memory's speed (one row: a third of it; see
`scripts/bench_gemv.py`). This pass rewrites, in the graphs inductor compiles, each
product `x · Wᵀ` (aten `mm` / `addmm`, x [M, K], Wᵀ [K, N]) as

    y = (W[:, None, :] · x[None, :, :]).sum(-1)ᵀ      W [N, 1, K] · x [1, M, K] -> [N, M] -> [M, N]

which inductor lowers to one loop nest: for each output feature n, the weight row W[n]
(K values, in the L1 cache) against every one of the M rows, summed over K in vector
registers. Each weight is read once from memory whatever M is, and nothing [N, M, K] is
ever stored. The result is stored row-major [M, N] (not as the transposed view of [N, M]
that the formula gives), so that the next product's rows are K-contiguous too: otherwise
inductor vectorises that product over M instead of K. The inputs are realised first, so
that inductor does not inline the ops that make x (a norm, say) into the loop nest and
redo them for every n.

Measured on the bench model's layers (hidden 512, MLP 1376; one thread, 2-core AMD EPYC
VM, MKL): six MLP blocks at 1 / 4 / 16 / 64 rows took 0.37 / 0.61 / 0.92 / 1.0 of
the `mm` graph's time. `max_rows` bounds the M the pass rewrites, in terms dynamo knows
statically (a graph for M = 1, or for a range of M marked dynamic with its bounds:
engine/compiled.py keeps it at 8).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

MAX_SIDE = 16384  # weights with a side above this are left to mm (a vocabulary projection is still below)


def _mm(mat1: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    # mat1 [M, K], mat2 [K, N] (a weight's transpose: W = mat2ᵀ [N, K] is contiguous in K)
    # [N, M, K] -> [N, M] -> [M, N], stored row-major: the next product then reads its rows K-contiguous too
    return (mat2.t()[:, None, :] * mat1[None, :, :]).sum(-1).t().contiguous().to(mat1.dtype)


def _addmm(bias: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    return _mm(mat1, mat2) + bias  # [M, N] + [N]


class WeightStationaryProducts(CustomGraphPass):
    """The rewrite, for graphs whose row count is statically at most `max_rows` (None: any)."""

    def __init__(self, max_rows: int | None) -> None:
        self.max_rows = max_rows
        self._patterns = PatternMatcherPass(pass_name="loramux_weight_stationary_products")
        register_graph_pattern(CallFunction(aten.mm, Arg(), Arg()), pass_dict=self._patterns)(self._rewrite_mm)
        register_graph_pattern(CallFunction(aten.addmm, Arg(), Arg(), Arg()), pass_dict=self._patterns)(
            self._rewrite_addmm
        )

    def __call__(self, graph: torch.fx.Graph) -> None:
        self._patterns.apply(graph)

    def uuid(self) -> Any:
        return hashlib.sha256(Path(__file__).read_bytes() + repr(self.max_rows).encode()).hexdigest()

    def _applies(self, mat1: torch.fx.Node, mat2: torch.fx.Node) -> bool:
        a, b = mat1.meta.get("val"), mat2.meta.get("val")
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            return False
        if a.dim() != 2 or b.dim() != 2 or a.device.type != "cpu" or b.device.type != "cpu":
            return False
        if not a.dtype.is_floating_point or not statically_known_true(b.stride(0) == 1):  # Wᵀ of a K-contiguous W
            return False
        sides = statically_known_true(b.shape[0] <= MAX_SIDE) and statically_known_true(b.shape[1] <= MAX_SIDE)
        return sides and (self.max_rows is None or statically_known_true(a.shape[0] <= self.max_rows))

    def _rewrite_mm(self, match: Match, mat1: torch.fx.Node, mat2: torch.fx.Node) -> None:
        if self._applies(mat1, mat2):
            _replace(match, _mm, [mat1, mat2])

    def _rewrite_addmm(self, match: Match, bias: torch.fx.Node, mat1: torch.fx.Node, mat2: torch.fx.Node) -> None:
        b = bias.meta.get("val")
        if isinstance(b, torch.Tensor) and b.dim() == 1 and self._applies(mat1, mat2):
            _replace(match, _addmm, [bias, mat1, mat2])


def _replace(match: Match, repl: Any, inputs: list[torch.fx.Node]) -> None:
    match.replace_by_example(repl, inputs)
    # the inputs are computed once, before the loop nest: otherwise inductor may inline the ops that
    # make x (a norm, say) into the reduction and redo them for every output feature
    for n in inputs:
        n.meta["inductor_realize_to_strides"] = True
    counters["inductor"]["loramux_products"] += 1  # replayed on a cache hit too (tests read it)
