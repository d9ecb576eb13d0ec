"""The CUDA fast path of batched LoRA: Punica-style SGMV kernels in Triton, reading the stacks in place.

For one rank bucket (lora_stacks.py: a [cap, in, ρ], b [cap, ρ, out]) and its segments in
this forward, given as rows (start, length, stack index), two launches do every segment:

    shrink   xa[start:start+n] = x[start:start+n] · a[i]          grid (segments, ⌈maxlen/BM⌉)
    expand   y[start:start+n] += xa[start:start+n] · b[i] (+ shift[i])   grid (segments, ⌈maxlen/BM⌉, ⌈out/BN⌉)

Each program reads its segment's A / B tiles through the stack index (no gather, no
padding to a common length, no copy of any weight), accumulates in float32, and owns its
rows of y (every row is in one segment), so no atomics. Float32 inputs multiply in IEEE
precision (no TF32), so the path equals the torch reference to float rounding.

Off CUDA the same kernels run in Triton's interpreter (numpy, on the CPU): the tests check
them there on tiny shapes. `available()` says whether the compiled path can run here.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from loramux.adapters.kinds.lora_stacks import Bucket

try:  # an optional dependency: the path is only chosen where it imports
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None
    tl = None

BM = 16  # rows per program
BK = 32  # input features per step of the shrink
BN = 64  # output features per program of the expand


def installed() -> bool:
    return triton is not None


def available() -> bool:
    """The compiled kernels can run: triton is installed and there is a CUDA device."""
    return triton is not None and torch.cuda.is_available()


def _shrink(
    x_ptr,
    a_ptr,
    xa_ptr,
    meta_ptr,
    in_f,
    sx0,
    sx1,
    sa0,
    sa1,
    sa2,
    sxa0,  # noqa: ANN001
    RANK: tl.constexpr,
    BR: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    IEEE: tl.constexpr,
):  # noqa: N803
    seg = tl.program_id(0)
    start = tl.load(meta_ptr + seg * 3)
    n = tl.load(meta_ptr + seg * 3 + 1)
    pos = tl.load(meta_ptr + seg * 3 + 2).to(tl.int64)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)  # [BM]
    if tl.program_id(1) * BM < n:
        cols = tl.arange(0, BR)  # [BR]
        acc = tl.full((BM, BR), 0.0, tl.float32)
        for k0 in range(0, in_f, BK):
            ks = k0 + tl.arange(0, BK)  # [BK]
            xt = tl.load(
                x_ptr + (start + rows)[:, None].to(tl.int64) * sx0 + ks[None, :] * sx1,
                mask=(rows[:, None] < n) & (ks[None, :] < in_f),
                other=0.0,
            )  # [BM, BK]
            at = tl.load(
                a_ptr + pos * sa0 + ks[:, None] * sa1 + cols[None, :] * sa2,
                mask=(ks[:, None] < in_f) & (cols[None, :] < RANK),
                other=0.0,
            )  # [BK, BR]
            if IEEE:
                acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(xt, at)
        tl.store(xa_ptr + (start + rows)[:, None].to(tl.int64) * sxa0 + cols[None, :], acc, mask=rows[:, None] < n)


def _expand(
    xa_ptr,
    b_ptr,
    shift_ptr,
    y_ptr,
    meta_ptr,
    out_f,
    sxa0,
    sb0,
    sb1,
    sb2,
    ss0,
    sy0,
    sy1,  # noqa: ANN001
    RANK: tl.constexpr,
    BR: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,  # noqa: N803
    HAS_SHIFT: tl.constexpr,
    IEEE: tl.constexpr,
):  # noqa: N803
    seg = tl.program_id(0)
    start = tl.load(meta_ptr + seg * 3)
    n = tl.load(meta_ptr + seg * 3 + 1)
    pos = tl.load(meta_ptr + seg * 3 + 2).to(tl.int64)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)  # [BM]
    if tl.program_id(1) * BM < n:
        cols = tl.program_id(2) * BN + tl.arange(0, BN)  # [BN]
        rs = tl.arange(0, BR)  # [BR]
        row_ok = rows[:, None] < n
        xat = tl.load(
            xa_ptr + (start + rows)[:, None].to(tl.int64) * sxa0 + rs[None, :],
            mask=row_ok & (rs[None, :] < RANK),
            other=0.0,
        )  # [BM, BR] float32
        bt = tl.load(
            b_ptr + pos * sb0 + rs[:, None] * sb1 + cols[None, :] * sb2,
            mask=(rs[:, None] < RANK) & (cols[None, :] < out_f),
            other=0.0,
        )  # [BR, BN]
        if IEEE:
            acc = tl.dot(xat, bt.to(tl.float32), input_precision="ieee")  # [BM, BN]
        else:
            acc = tl.dot(xat.to(bt.dtype), bt).to(tl.float32)
        if HAS_SHIFT:
            acc += tl.load(shift_ptr + pos * ss0 + cols, mask=cols < out_f, other=0.0).to(tl.float32)[None, :]
        yp = y_ptr + (start + rows)[:, None].to(tl.int64) * sy0 + cols[None, :] * sy1
        ok = row_ok & (cols[None, :] < out_f)
        yt = tl.load(yp, mask=ok, other=0.0)
        tl.store(yp, (yt.to(tl.float32) + acc).to(yt.dtype), mask=ok)


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """The two kernels, compiled (CUDA) or for Triton's interpreter (CPU tensors)."""
    if triton is None:
        raise RuntimeError("the triton LoRA path needs the triton package")
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_shrink), InterpretedFunction(_expand)
    return triton.jit(_shrink), triton.jit(_expand)


def sgmv(y: torch.Tensor, x: torch.Tensor, bk: Bucket, meta: torch.Tensor, maxlen: int, shifted: bool) -> None:
    """y[rows] += x[rows]·a[i]·b[i] (+ shift[i]) for every segment (start, length, i) of meta [nseg, 3] int32.

    y: [tokens, out], x: [tokens, in], both on the stacks' device.
    """
    nseg = int(meta.shape[0])
    if nseg == 0:
        return
    shrink, expand = _kernels(not y.is_cuda)
    rank = bk.rank
    br = max(16, rank)  # tl.dot tiles are at least 16 wide; the extra columns are masked
    ieee = x.dtype == torch.float32
    xa = torch.empty(x.shape[0], br, dtype=torch.float32, device=x.device)  # [tokens, BR]
    m_blocks = -(-maxlen // BM)
    a, b = bk.a, bk.b
    shrink[(nseg, m_blocks)](
        x,
        a,
        xa,
        meta,
        x.shape[1],
        x.stride(0),
        x.stride(1),
        a.stride(0),
        a.stride(1),
        a.stride(2),
        xa.stride(0),
        RANK=rank,
        BR=br,
        BM=BM,
        BK=BK,
        IEEE=ieee,
    )
    shift = bk.shift if shifted and bk.shift is not None else None
    out_f = y.shape[1]
    expand[(nseg, m_blocks, -(-out_f // BN))](
        xa, b, shift if shift is not None else b, y, meta, out_f, xa.stride(0), b.stride(0), b.stride(1), b.stride(2),
        shift.stride(0) if shift is not None else 0, y.stride(0), y.stride(1),
        RANK=rank, BR=br, BM=BM, BN=BN, HAS_SHIFT=shift is not None, IEEE=ieee,
    )  # fmt: skip
