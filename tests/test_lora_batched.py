"""Every LoRA path (lora_batched.py) equals the per-segment reference, layer by layer and against PEFT.

Paths: "grouped" (pure torch, spans over the rank-bucketed stacks), the same with every
bucket forced into spans (a huge op cost), "auto", and "triton" (the CUDA kernels, here in
Triton's interpreter on the CPU; skipped where triton is not installed).
"""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig
from peft_helpers import make_peft_adapter, mixed_logits, reference_logits
from torch.profiler import ProfilerActivity, profile
from transformers.pytorch_utils import Conv1D

from loramux.adapters.formats.loader import load_adapter_dir
from loramux.adapters.kinds import lora_batched, lora_triton
from loramux.adapters.kinds.lora import MergedWeight
from loramux.adapters.kinds.lora_plan import HostIndices
from loramux.adapters.kinds.lora_stacks import bucket_rank
from loramux.adapters.model.linear import MultiAdapterLinear
from loramux.adapters.model.wrapped import WrappedModel
from loramux.engine.forward_context import BASE_SLOT, AdapterContext, ContextHolder, Segment, row_segments, to_device
from loramux.model import build_from_config, tiny_llama_config

ATOL = 1e-5  # float32: the same sums in another order
IN, OUT = 48, 40
needs_triton = pytest.mark.skipif(not lora_triton.installed(), reason="triton is not installed")
PATHS = ["grouped", "spans", "auto", pytest.param("triton", marks=needs_triton)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lora(layer: MultiAdapterLinear, slot: int, r: int, seed: int, **kw) -> None:
    g = _gen(seed)
    w = layer.base_layer.weight
    a = torch.randn(r, IN, generator=g) / IN**0.5
    b = torch.randn(OUT, r, generator=g) / r**0.5
    kw = {k: v.to(w.device, w.dtype) for k, v in kw.items()}
    layer.set_lora(slot, a.to(w.device, w.dtype), b.to(w.device, w.dtype), **kw)


RANKS = (4, 256, 16, 8, 128, 5, 64, 12, 33, 4, 8, 16, 32, 100, 8, 16)


def _mixed_layer(conv1d: bool = False, num_slots: int = 20, device: str = "cpu", dtype=torch.float32):  # noqa: ANN001
    """LoRA of ranks 4..256 in most slots; LoRA + bias, DoRA, IA3 (out, feed-forward), a bias delta, empty."""
    torch.manual_seed(0)
    base = Conv1D(OUT, IN) if conv1d else torch.nn.Linear(IN, OUT)
    torch.nn.init.normal_(base.weight, std=0.2)
    torch.nn.init.normal_(base.bias, std=0.2)
    layer = MultiAdapterLinear(base.to(device, dtype), ContextHolder(), num_slots)
    g = _gen(1)

    def vec(n: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        return (offset + scale * torch.randn(n, generator=g)).to(device, dtype)

    for slot, r in enumerate(RANKS):
        _lora(layer, slot, r, seed=10 + slot)
    _lora(layer, 6, 64, seed=16, lora_bias=vec(OUT))  # LoRA + bias: plain, shifted
    _lora(layer, 7, 12, seed=17, dora_g=vec(OUT, 0.3, 1.0))  # DoRA
    layer.set_ia3(16, vec(OUT, 0.3, 1.0), feedforward=False)
    layer.set_ia3(17, vec(IN, 0.3, 1.0), feedforward=True)
    layer.set_bias_delta(18, vec(OUT))
    layer.set_bias_delta(11, vec(OUT))  # LoRA + base-bias delta: still plain
    return layer  # slot 19: empty


def _rows(lengths: dict[int, int], base_at: tuple[int, ...] = (0, 3, 9)) -> list[int]:
    """Row slots grouped by slot, in slot order, with base rows before the segments listed in `base_at`."""
    rows: list[int] = []
    for i, (slot, n) in enumerate(lengths.items()):
        if i in base_at:
            rows += [BASE_SLOT] * (1 + i % 3)
        rows += [slot] * n
    return rows


def _run(layer: MultiAdapterLinear, rows: list[int], path: str, merged_slot: int = BASE_SLOT) -> torch.Tensor:
    ctx = AdapterContext.from_row_slots(rows, torch.device("cpu"), merged_slot=merged_slot)
    layer.holder.set(ctx)
    x = torch.randn(1, len(rows), IN, generator=_gen(5))
    old = lora_batched.C_OP
    if path == "spans":  # every segment that can join a span does: the span code on every layout
        path, lora_batched.C_OP = "grouped", 1e15
    try:
        with lora_batched.force(path), torch.no_grad():
            return layer(x)[0]
    finally:
        lora_batched.C_OP = old
        layer.holder.set(None)


LENGTHS = {
    "decode": {s: 1 + s % 3 for s in range(20)},  # short, unequal, every kind
    "equal": {s: 3 for s in range(16)},  # adjacent, equal: spans are views
    "prefill_mix": {0: 1, 1: 37, 2: 3, 3: 1, 5: 60, 6: 2, 7: 9, 8: 4, 9: 1, 10: 6, 11: 23, 12: 1, 16: 5, 17: 2},
    "holes": {0: 2, 3: 1, 9: 2, 12: 3, 14: 1, 19: 2},  # a few slots of each bucket: holes in the spans
}


@pytest.mark.parametrize("shape", list(LENGTHS))
@pytest.mark.parametrize("path", PATHS)
def test_every_path_equals_per_segment(path, shape):
    layer = _mixed_layer()
    rows = _rows(LENGTHS[shape], base_at=() if shape == "equal" else (0, 3, 9))
    ref = _run(layer, rows, "segment")
    base = _run(layer, [BASE_SLOT] * len(rows), "segment")
    adapted = torch.tensor([r not in (BASE_SLOT, 19) for r in rows])
    assert (ref[adapted] - base[adapted]).abs().min() > 0, "every adapter must change its rows"
    torch.testing.assert_close(_run(layer, rows, path), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("path", ["grouped", "spans"])
def test_conv1d_layers(path):
    layer = _mixed_layer(conv1d=True)
    rows = _rows(LENGTHS["decode"])
    torch.testing.assert_close(_run(layer, rows, path), _run(layer, rows, "segment"), atol=ATOL, rtol=0)


@pytest.mark.parametrize("merged", [0, 11, 7])  # plain LoRA, LoRA + bias delta (subtract), DoRA (split per row)
@pytest.mark.parametrize("path", ["segment", *PATHS])
def test_merged_slot_rows_and_others_are_exact(merged, path):
    layer = _mixed_layer()
    d = layer.deltas[merged]
    w = layer.base_weight_rows()
    g = d.out_scale if d.out_scale is not None else torch.ones(OUT)
    shift = d.out_shift if d.out_shift is not None else torch.zeros(OUT)
    layer.set_merged(merged, MergedWeight(g[:, None] * w + (d.a_t @ d.b_t).t(), g * layer.bias + shift, 0))
    lengths = {s: 1 + s % 4 for s in range(19) if s != merged}
    rows = _rows(lengths) + [merged] * 6  # the merged slot's rows last, as the runner orders them
    ref = _run(layer, rows, "segment")  # no merged slot: per-row deltas, exact
    torch.testing.assert_close(_run(layer, rows, path, merged_slot=merged), ref, atol=ATOL, rtol=0)


def test_stacks_bucket_by_rank_and_hold_the_weights_once():
    layer = _mixed_layer()
    st = layer.stacked
    assert sorted(st.buckets) == [4, 8, 16, 32, 64, 128, 256]
    assert st.buckets[8].order == [3, 5, 10, 14] and st.buckets[16].order == [2, 11, 15]  # rank 5 -> bucket 8
    assert 7 not in st.where and 16 not in st.where  # DoRA, IA3: per segment
    # a rank-8 slot costs 8 columns however large the layer's largest rank
    assert layer.slot_nbytes(3) == (IN + OUT) * 8 * 4
    assert layer.slot_nbytes(6) == (IN + OUT) * 64 * 4 + OUT * 4  # and its shift
    bk = st.buckets[8]
    d = layer.deltas[5]
    assert d.a_t.data_ptr() == bk.a[1].data_ptr() and d.b_t.data_ptr() == bk.b[1].data_ptr()
    assert d.a_t.shape == (IN, 5) and d.b_t.shape == (5, OUT)
    assert [bucket_rank(r) for r in (1, 4, 5, 8, 9, 200, 256)] == [4, 4, 8, 8, 16, 256, 256]


def test_stacks_shrink_when_large_ranks_leave_and_stay_exact():
    layer = _mixed_layer()
    st = layer.stacked
    rows = _rows({s: 2 for s in range(20)})
    before = layer.resident_nbytes()
    for slot in (1, 4, 13):  # ranks 256, 128, 100: their buckets empty out
        layer.clear(slot)
    assert 256 not in st.buckets and 128 not in st.buckets
    freed = (IN + OUT) * (256 + 128 + 128) * 4
    assert layer.resident_nbytes() <= before - freed
    torch.testing.assert_close(_run(layer, rows, "grouped"), _run(layer, rows, "segment"), atol=ATOL, rtol=0)
    # churn: members move inside their bucket, views are re-pointed; capacity halves when a quarter full
    for slot, r in ((1, 16), (4, 16), (13, 16), (19, 16), (0, 16)):
        _lora(layer, slot, r, seed=70 + slot)
    assert st.buckets[16].order == [0, 1, 2, 4, 11, 13, 15, 19] and st.buckets[16].capacity == 8
    for slot in (0, 1, 2, 4, 11, 13):
        layer.clear(slot)
    assert st.buckets[16].order == [15, 19] and st.buckets[16].capacity == 4
    assert st.nbytes() == sum(bk.nbytes() for bk in st.buckets.values())
    ref = _run(layer, rows, "segment")
    torch.testing.assert_close(_run(layer, rows, "grouped"), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(ref[torch.tensor(rows) == 5], _run(layer, rows, "segment")[torch.tensor(rows) == 5])
    gone = torch.tensor(rows) == 4
    base = _run(layer, [BASE_SLOT] * len(rows), "segment")
    torch.testing.assert_close(ref[gone], base[gone])


def test_grouped_path_never_copies_weights():
    """No 3-D gather of the stacks: index_select only ever reads activations (2-D)."""
    layer = _mixed_layer()
    rows = _rows(LENGTHS["decode"])
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _run(layer, rows, "spans")
    gathers = [e for e in prof.events() if e.name == "aten::index_select"]
    assert gathers, "the decode layout gathers its rows"
    assert all(len(e.input_shapes[0]) == 2 for e in gathers), [e.input_shapes for e in gathers]


def test_plan_groups_by_stack_index():
    layer = _mixed_layer()
    bk = layer.stacked.buckets[8]  # slots 3, 5, 10, 14
    cpu = torch.device("cpu")
    # decode: one row each, adjacent, all four members: one span, a view (no gather)
    segs = [Segment(i, i + 1, s) for i, s in enumerate(bk.order)]
    plan = lora_batched.plan_bucket(bk, segs, layer.stacked, "grouped", cpu)
    assert len(plan.spans) == 1 and not plan.singles and plan.spans[0].view == (0, 4)
    # a long prefill segment runs alone; so does the row before it (a gathered span of two costs more
    # ops than two matmuls), while the two adjacent rows after it are one span, a view
    segs = [Segment(0, 1, 3), Segment(1, 400, 5), Segment(400, 401, 10), Segment(401, 402, 14)]
    plan = lora_batched.plan_bucket(bk, segs, layer.stacked, "grouped", cpu)
    assert sorted(s.slot for s, _ in plan.singles) == [3, 5]
    assert len(plan.spans) == 1 and plan.spans[0].view == (400, 402) and plan.spans[0].lo == 2
    # with base rows between the short ones, the three share one gathered, padded span around the hole
    segs = [Segment(0, 1, 3), Segment(1, 400, 5), Segment(401, 402, 10), Segment(403, 405, 14)]
    plan = lora_batched.plan_bucket(bk, segs, layer.stacked, "grouped", cpu)
    assert [s.slot for s, _ in plan.singles] == [5]
    span = plan.spans[0]
    assert (span.lo, span.k, span.m) == (0, 4, 2) and span.view is None and span.rows.tolist() == [0, 401, 403, 404]
    plan = lora_batched.plan_bucket(bk, segs, layer.stacked, "triton", cpu)
    assert plan.sgmv.tolist() == [[0, 1, 0], [1, 399, 1], [401, 1, 2], [403, 2, 3]] and plan.maxlen == 399
    with pytest.raises(ValueError, match="LoRA path"):
        with lora_batched.force("fast"):
            pass


@pytest.mark.parametrize("path", ["spans", pytest.param("triton", marks=needs_triton)])
def test_prepared_plans_ride_in_the_forwards_one_copy(path):
    """The runner's order: every layer prepares (one plan per stack layout), one copy carries the
    forward's own indices and the plans', then the layers run on those plans, equal to the reference."""
    holder = ContextHolder()
    layers = [_mixed_layer(), _mixed_layer()]  # one stack layout: one plan for both
    for layer in layers:
        layer.holder = holder
    rows = _rows(LENGTHS["decode"])
    x = torch.randn(1, len(rows), IN, generator=_gen(5))
    ref = _run(layers[0], rows, "segment")
    old = lora_batched.C_OP
    forced, lora_batched.C_OP = ("grouped", 1e15) if path == "spans" else (path, old)
    try:
        with lora_batched.force(forced), torch.no_grad():
            ctx = AdapterContext(None, row_segments(rows), BASE_SLOT, "auto")
            host = HostIndices()
            for layer in layers:
                layer.prepare(ctx, host)
            assert host.lists and len(ctx._memo) == 1
            (plans,) = ctx._memo.values()
            t = to_device([rows, *host.lists], torch.device("cpu"))
            host.bind(t[1:])
            ctx.slots = t[0]
            indices = [s.idx for p in plans for s in p.spans if s.idx is not None]
            indices += [p.sgmv for p in plans if p.sgmv is not None]
            buffer = t[0].untyped_storage().data_ptr()
            assert indices and all(i.untyped_storage().data_ptr() == buffer for i in indices)
            holder.set(ctx)
            outs = [layer(x)[0] for layer in layers]
    finally:
        lora_batched.C_OP = old
        holder.set(None)
    assert len(ctx._memo) == 1 and next(iter(ctx._memo.values())) is plans  # the layers ran the prepared plan
    for out in outs:
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# --- the whole model against PEFT, every path --------------------------------------------------

PEFT_CASES = [
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], rank_pattern={"k_proj": 6}),
    LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    LoraConfig(r=64, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    LoraConfig(r=16, lora_alpha=2, target_modules=["up_proj", "gate_proj", "v_proj"]),
]


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("batched-peft")
    wrapped = WrappedModel(build_from_config(tiny_llama_config(), seed=0), num_slots=len(PEFT_CASES))
    models = []
    for i, cfg in enumerate(PEFT_CASES):
        models.append(make_peft_adapter(tiny_llama_config(), cfg, root / str(i), seed=500 + i))
        load_adapter_dir(root / str(i), wrapped).install(wrapped, i)
    return wrapped, models, build_from_config(tiny_llama_config(), seed=0).eval()


@pytest.mark.parametrize("path", ["segment", *PATHS])
def test_mixed_batch_matches_peft_every_path(peft_setup, path):
    wrapped, models, base = peft_setup
    g = _gen(3)
    lengths = [1, 9, 2, 1, 17, 3, 1, 5, 2]  # decode-like and prefill-like
    seqs, slots, refs = [], [], []
    for i, n in enumerate(lengths):
        slot = BASE_SLOT if i == 2 else min(i, len(PEFT_CASES) - 1)
        seqs.append(torch.randint(3, 259, (n,), generator=g))
        slots.append(slot)
        refs.append(base if slot == BASE_SLOT else models[slot])
    order = sorted(range(len(seqs)), key=lambda i: slots[i])
    seqs, slots, refs = [seqs[i] for i in order], [slots[i] for i in order], [refs[i] for i in order]
    old = lora_batched.C_OP
    if path == "spans":
        path, lora_batched.C_OP = "grouped", 1e15
    try:
        with lora_batched.force(path):
            got = mixed_logits(wrapped, seqs, slots)
    finally:
        lora_batched.C_OP = old
    for logits, seq, ref in zip(got, seqs, refs):
        torch.testing.assert_close(logits, reference_logits(ref, seq), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not lora_triton.available(), reason="needs triton and a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_compiled_on_cuda_equals_per_segment(dtype):
    """The compiled kernels (not the interpreter) on every layout, against the reference on the same GPU."""
    layer = _mixed_layer(device="cuda", dtype=dtype)
    for shape, lengths in LENGTHS.items():
        rows = _rows(lengths)
        ctx = AdapterContext.from_row_slots(rows, torch.device("cuda"))
        layer.holder.set(ctx)
        x = torch.randn(1, len(rows), IN, generator=_gen(5)).to("cuda", dtype)
        try:
            with torch.no_grad():
                with lora_batched.force("segment"):
                    ref = layer(x)[0].float()
                ctx._memo.clear()
                with lora_batched.force("auto"):
                    got = layer(x)[0].float()
        finally:
            layer.holder.set(None)
        tol = ATOL if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got, ref, atol=tol, rtol=0 if dtype == torch.float32 else 2e-2, msg=shape)
