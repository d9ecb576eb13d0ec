"""Batched LoRA (lora_batched.py) equals the per-segment reference path, layer by layer and against PEFT."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig
from peft_helpers import make_peft_adapter, mixed_logits, reference_logits
from transformers.pytorch_utils import Conv1D

from loramux.adapters.formats.loader import load_adapter_dir
from loramux.adapters.kinds import lora_batched
from loramux.adapters.kinds.lora import MergedWeight
from loramux.adapters.model.linear import MultiAdapterLinear
from loramux.adapters.model.wrapped import WrappedModel
from loramux.engine.forward_context import BASE_SLOT, AdapterContext, ContextHolder, Segment
from loramux.model import build_from_config, tiny_llama_config

ATOL = 1e-5  # float32, batched vs per-segment: the same sums in another order
IN, OUT = 48, 40


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lora(layer: MultiAdapterLinear, slot: int, r: int, seed: int, **kw) -> None:
    g = _gen(seed)
    layer.set_lora(slot, torch.randn(r, IN, generator=g) * 0.3, torch.randn(OUT, r, generator=g) * 0.3, **kw)


def _mixed_layer(conv1d: bool = False, num_slots: int = 16) -> MultiAdapterLinear:
    """Slots: LoRA of ranks 1..16, LoRA + bias, DoRA, IA3 (out and feed-forward), a bias delta alone, empty."""
    torch.manual_seed(0)
    base = Conv1D(OUT, IN) if conv1d else torch.nn.Linear(IN, OUT)
    torch.nn.init.normal_(base.weight, std=0.2)
    torch.nn.init.normal_(base.bias, std=0.2)
    layer = MultiAdapterLinear(base, ContextHolder(), num_slots)
    g = _gen(1)
    for slot, r in zip(range(6), (1, 4, 16, 8, 2, 3)):
        _lora(layer, slot, r, seed=10 + slot)
    _lora(layer, 6, 4, seed=16, lora_bias=torch.randn(OUT, generator=g))
    _lora(layer, 7, 4, seed=17, dora_g=1 + 0.3 * torch.randn(OUT, generator=g))
    layer.set_ia3(8, 1 + 0.3 * torch.randn(OUT, generator=g), feedforward=False)
    layer.set_ia3(9, 1 + 0.3 * torch.randn(IN, generator=g), feedforward=True)
    layer.set_bias_delta(10, torch.randn(OUT, generator=g))
    _lora(layer, 11, 2, seed=21)
    layer.set_bias_delta(11, torch.randn(OUT, generator=g))  # LoRA + base-bias delta: still plain
    for slot in range(12, num_slots):
        _lora(layer, slot, 1 + slot % 5, seed=30 + slot)
    return layer


def _rows(lengths: dict[int, int], base_at: tuple[int, ...] = (0, 3)) -> list[int]:
    """Row slots grouped by slot, in slot order, with base rows before the segments listed in `base_at`."""
    rows: list[int] = []
    for i, (slot, n) in enumerate(lengths.items()):
        if i in base_at:
            rows += [BASE_SLOT] * (1 + i % 3)
        rows += [slot] * n
    return rows


def _run(layer: MultiAdapterLinear, rows: list[int], mode: str, merged_slot: int = BASE_SLOT) -> torch.Tensor:
    ctx = AdapterContext.from_row_slots(rows, torch.device("cpu"), merged_slot=merged_slot)
    layer.holder.set(ctx)
    x = torch.randn(1, len(rows), IN, generator=_gen(5))
    try:
        with lora_batched.force(mode), torch.no_grad():
            return layer(x)[0]
    finally:
        layer.holder.set(None)


def _count_batched(monkeypatch) -> dict[str, int]:
    calls = {"n": 0}
    orig = lora_batched.batched_lora

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(lora_batched, "batched_lora", counting)
    return calls


LENGTHS = {
    "decode": {s: 1 + s % 3 for s in range(16)},  # short, unequal
    "equal": {s: 4 for s in range(16)},  # contiguous, equal: the no-gather span path
    "prefill_mix": {0: 1, 1: 57, 2: 3, 3: 1, 5: 200, 6: 2, 7: 9, 8: 4, 9: 1, 10: 6, 11: 33, 12: 1},
    "few": {2: 5, 7: 3},
}


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("shape", list(LENGTHS))
def test_batched_equals_per_segment(monkeypatch, conv1d, shape):
    layer = _mixed_layer(conv1d)
    layer.clear(14)  # an empty slot with rows
    rows = _rows(LENGTHS[shape]) if shape != "equal" else _rows(LENGTHS[shape], base_at=())
    calls = _count_batched(monkeypatch)
    ref = _run(layer, rows, "segment")
    assert calls["n"] == 0
    plain = torch.tensor(rows) >= 0
    base = _run_base(layer, rows)
    assert (ref[plain] - base[plain]).abs().max() > 1e-2, "the adapters must change the output"
    for mode in ("batched", "auto"):
        torch.testing.assert_close(_run(layer, rows, mode), ref, atol=ATOL, rtol=0)
    assert calls["n"] >= 1  # forced batched ran at least once


def _run_base(layer: MultiAdapterLinear, rows: list[int]) -> torch.Tensor:
    return _run(layer, [BASE_SLOT] * len(rows), "segment")


@pytest.mark.parametrize("merged", [0, 11, 7])  # plain LoRA, LoRA + bias delta (subtract), DoRA (not subtractable)
def test_merged_slot_rows_get_no_arithmetic_and_others_are_exact(merged):
    layer = _mixed_layer()
    d = layer.deltas[merged]
    w = layer.base_weight_rows()
    a_t, b_t = d.a_t, d.b_t
    g = d.out_scale if d.out_scale is not None else torch.ones(OUT)
    shift = d.out_shift if d.out_shift is not None else torch.zeros(OUT)
    merged_w = g[:, None] * w + (a_t @ b_t).t()
    layer.set_merged(merged, MergedWeight(merged_w, g * layer.bias + shift, 0))
    lengths = {s: 1 + s % 4 for s in range(13) if s != merged} | {merged: 6}
    rows = _rows(lengths)  # the merged slot's rows last, as the runner orders them
    rows = [r for r in rows if r != merged] + [merged] * 6
    ref = _run(layer, rows, "segment")  # no merged slot: per-row deltas, exact
    for mode in ("segment", "batched", "auto"):
        torch.testing.assert_close(_run(layer, rows, mode, merged_slot=merged), ref, atol=ATOL, rtol=0)


def test_rank_growth_shrink_and_clear_keep_every_slot_exact():
    layer = _mixed_layer()
    rows = _rows({s: 2 for s in range(16)})
    _lora(layer, 3, 32, seed=99)  # r_max grows 16 -> 32: every plain slot's views re-pointed
    assert layer.stacked.stacks()[0].shape == (16, IN, 32)
    ref = _run(layer, rows, "segment")
    torch.testing.assert_close(_run(layer, rows, "batched"), ref, atol=ATOL, rtol=0)
    _lora(layer, 3, 1, seed=98)  # smaller rank in the same slot: stale columns must be zero
    layer.set_ia3(2, torch.full((OUT,), 1.5), feedforward=False)  # LoRA + IA3: no longer plain
    layer.clear(5)
    assert 2 not in layer.stacked.plain and 5 not in layer.stacked.plain and 3 in layer.stacked.plain
    ref = _run(layer, rows, "segment")
    torch.testing.assert_close(_run(layer, rows, "batched"), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(ref[torch.tensor(rows) == 5], _run_base(layer, rows)[torch.tensor(rows) == 5])


def test_stacks_hold_the_weights_once():
    layer = _mixed_layer()
    a_all, b_all = layer.stacked.stacks()
    d = layer.deltas[2]
    assert d.a_t.data_ptr() == a_all[2].data_ptr() and d.b_t.data_ptr() == b_all[2].data_ptr()
    assert layer.slot_nbytes(2) == (IN + OUT) * 16 * 4


@pytest.fixture
def auto_mode():
    with lora_batched.force("auto"):
        yield


def test_plan_heuristic(auto_mode):
    cpu = torch.device("cpu")
    plain = frozenset(range(16))
    # eight one-row segments (base rows between two of them: a gather) and a long prefill in the middle
    segs = [Segment(i, i + 1, i) for i in range(4)] + [Segment(4, 300, 4)]
    segs += [Segment(301 + i, 302 + i, 5 + i) for i in range(4)]
    plan = lora_batched.plan_segments(segs, plain, cpu)
    assert plan is not None and [s.slot for s in plan.rest] == [4]  # the long prefill runs on its own
    assert [s.slot for s in plan.segments] == [0, 1, 2, 3, 5, 6, 7, 8] and plan.span is None
    assert plan.valid is None and plan.slot_range is None  # no padding; slots 0-3, 5-8: gathered
    assert lora_batched.plan_segments(segs[:7], plain, cpu) is None  # six short ones need a gather: too few
    assert lora_batched.plan_segments(segs, frozenset({0, 4}), cpu) is None
    equal = [Segment(2 * i, 2 * i + 2, i) for i in range(4)]
    adj = lora_batched.plan_segments(equal, plain, cpu)
    assert adj.span == (0, 8) and adj.slot_range == (0, 4)
    assert lora_batched.plan_segments(equal[:3], plain, cpu) is None
    with lora_batched.force("batched"):
        forced = lora_batched.plan_segments(segs, plain, cpu)
        assert len(forced.segments) == 9 and forced.maxlen == 296 and forced.valid.numel() == 304
        assert lora_batched.plan_segments(segs[:1], plain, cpu).span == (0, 1)
    with lora_batched.force("segment"):
        assert lora_batched.plan_segments(segs, plain, cpu) is None
    with pytest.raises(ValueError, match="mode"):
        with lora_batched.force("fast"):
            pass


# --- the whole model against PEFT, both paths ---------------------------------------------------

PEFT_CASES = [
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], rank_pattern={"k_proj": 6}),
    LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    LoraConfig(r=1, lora_alpha=2, target_modules=["up_proj", "gate_proj", "v_proj"]),
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


@pytest.mark.parametrize("mode", ["batched", "segment", "auto"])
def test_mixed_batch_matches_peft_both_paths(peft_setup, mode):
    wrapped, models, base = peft_setup
    g = _gen(3)
    lengths = [1, 9, 2, 1, 17, 3, 1, 5, 2]  # very different lengths: decode-like and prefill-like
    seqs, slots, refs = [], [], []
    for i, n in enumerate(lengths):
        slot = BASE_SLOT if i == 2 else min(i, len(PEFT_CASES) - 1)
        seqs.append(torch.randint(3, 259, (n,), generator=g))
        slots.append(slot)
        refs.append(base if slot == BASE_SLOT else models[slot])
    order = sorted(range(len(seqs)), key=lambda i: slots[i])
    seqs, slots, refs = [seqs[i] for i in order], [slots[i] for i in order], [refs[i] for i in order]
    with lora_batched.force(mode):
        got = mixed_logits(wrapped, seqs, slots)
    for logits, seq, ref in zip(got, seqs, refs):
        torch.testing.assert_close(logits, reference_logits(ref, seq), atol=1e-4, rtol=1e-4)
