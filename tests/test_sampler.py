"""The batch sampler against its oracles: the softmax itself, transformers' repetition penalty, OpenAI's penalties.

The logits are a real tiny model's (a Llama with a 16-token vocabulary, so that a
couple of thousand draws give a chi-square test enough counts in every bin).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from loramux.engine.request import Request, SamplingParams
from loramux.engine.sampler import Sampler, uniform
from loramux.model import build_from_config, tiny_llama_config

VOCAB = 16
DRAWS = 2000
# Critical p-value of the chi-square tests. The seeds are fixed, so each test is deterministic;
# for a correct sampler the statistic follows chi2(df), and 1e-3 is the chance that a fixed seed
# set lands in the tail at all. A wrong filter moves several percent of the mass (a top-k off by
# one, top-p not renormalised after top-k, min-p against the wrong maximum), which at 2000 draws
# gives p-values far below 1e-6: the power check below proves the test would see it.
ALPHA = 1e-3


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    """The next-token logits [VOCAB] of a tiny random Llama for a short prompt, float32."""
    model = build_from_config(tiny_llama_config(vocab_size=VOCAB), seed=3).eval()
    with torch.inference_mode():
        out = model(torch.tensor([[1, 5, 9, 3, 7]])).logits[0, -1].float()
    return out * (1.5 / out.std())  # a spread-out distribution, so the filters have work to do


def reference(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The sampling distribution [VOCAB] by definition, in float64, filter by filter."""
    x = logits.double() / p.temperature
    probs = torch.softmax(x, -1)
    order = torch.argsort(probs, descending=True, stable=True)
    keep = torch.ones(VOCAB, dtype=torch.bool)
    if 0 < p.top_k < VOCAB:
        keep[order[p.top_k :]] = False
    if p.top_p < 1.0:
        q = torch.where(keep, probs, 0.0)
        q = q / q.sum()
        mass_before = 0.0
        for v in order.tolist():
            if keep[v] and mass_before >= p.top_p:
                keep[v] = False
            mass_before += float(q[v])
    if p.min_p > 0:
        keep &= probs >= p.min_p * probs.max()
    out = torch.where(keep, probs, 0.0)
    return out / out.sum()


def draws(logits: torch.Tensor, params: SamplingParams, seed0: int) -> torch.Tensor:
    """Counts [VOCAB] of the first sampled token of DRAWS requests with seeds seed0.., 64 per batch."""
    sampler = Sampler()
    counts = torch.zeros(VOCAB, dtype=torch.long)
    for start in range(0, DRAWS, 64):
        reqs = []
        for s in range(start, min(start + 64, DRAWS)):
            r = Request(f"r{s}", [1, 5], params)
            r.seed = seed0 + s
            reqs.append(r)
        batch = logits[None, :].expand(len(reqs), VOCAB).contiguous()
        for t in sampler.sample(batch, reqs).tokens:
            counts[t] += 1
    return counts


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square for counts against probs; bins expecting < 5 are pooled."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = [*counts[big].double().tolist(), float(counts[~big].sum())]
    exp = [*expected[big].tolist(), float(expected[~big].sum())]
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


CASES = {
    "temperature": SamplingParams(temperature=0.7),
    "top-k": SamplingParams(temperature=1.0, top_k=5),
    "top-p": SamplingParams(temperature=0.8, top_p=0.8),
    "min-p": SamplingParams(temperature=1.2, min_p=0.15),
    "all": SamplingParams(temperature=0.9, top_k=8, top_p=0.7, min_p=0.15),
}


@pytest.mark.parametrize("name", list(CASES))
def test_first_token_follows_the_filtered_softmax(logits, name):
    params = CASES[name]
    want = reference(logits, params)
    counts = draws(logits, params, seed0=10_000 * (1 + list(CASES).index(name)))
    assert int(counts[want == 0].sum()) == 0, "a filtered-out token was drawn"
    assert chi_square_p(counts, want) > ALPHA, (counts.tolist(), (want * DRAWS).round().tolist())
    # Power: the same counts refute the distribution without the filters (or at temperature 1).
    plain = torch.softmax(logits.double() / (1.0 if name == "temperature" else params.temperature), -1)
    assert chi_square_p(counts, plain) < 1e-6


def test_degenerate_filters_equal_greedy(logits):
    batch = logits[None, :].repeat(3, 1)
    greedy = int(logits.argmax())
    for p in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-7),
              SamplingParams(temperature=1.5, min_p=1.0), SamplingParams(temperature=1e-40)):  # fmt: skip
        reqs = [Request("r", [1], p, seed=s) for s in range(3)]
        assert Sampler().sample(batch, reqs).tokens == [greedy] * 3, p


def test_uniforms_are_uniform_and_depend_only_on_seed_and_index():
    u = torch.tensor([uniform(s, n) for s in range(200) for n in range(20)], dtype=torch.float64)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert chi_square_p(counts.long(), torch.full((10,), 0.1, dtype=torch.float64)) > ALPHA
    assert uniform(7, 3) == uniform(7, 3) and uniform(7, 3) != uniform(8, 3) != uniform(7, 4)


def _with_history(prompt: list[int], output: list[int], **params: float) -> Request:
    r = Request("r", prompt, SamplingParams(**params))
    r.output_ids = list(output)
    return r


def test_repetition_penalty_equals_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 40, generator=g) * 3  # [B, vocab], both signs
    reqs = [
        _with_history([3, 4, 5], [6, 6, 7], repetition_penalty=1.3),
        _with_history([10, 11], [], repetition_penalty=0.7),  # < 1 rewards repeats
        _with_history([1], [2, 3], repetition_penalty=1.0),  # no penalty, in the same batch
        _with_history([20, 21, 22], [21, 30], repetition_penalty=2.0),
    ]
    got = Sampler().penalties.apply(logits, [0, 1, 2, 3], reqs)
    for i, r in enumerate(reqs):
        proc = RepetitionPenaltyLogitsProcessor(r.params.repetition_penalty)
        want = proc(torch.tensor([r.all_ids]), logits[i : i + 1].clone())[0]
        torch.testing.assert_close(got[i], want, rtol=0, atol=0)


def test_presence_and_frequency_penalties_by_their_definition():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 30, generator=g)
    reqs = [
        _with_history([1, 2, 9], [5, 5, 5, 7], presence_penalty=0.5, frequency_penalty=0.25),
        _with_history([4], [8], presence_penalty=-1.0),
        _with_history([9, 9], [9, 2, 2], frequency_penalty=2.0, repetition_penalty=1.5),
    ]
    sampler = Sampler()
    # Only rows 0 and 2 are penalised; row 1 (index 1 of the batch) is left as it was.
    got = sampler.penalties.apply(logits, [0, 2], [reqs[0], reqs[2]])
    torch.testing.assert_close(got[1], logits[1], rtol=0, atol=0)
    for i, r in ((0, reqs[0]), (2, reqs[2])):
        want = logits[i].clone()
        seen = set(r.all_ids)
        for v in seen:  # repetition first, over prompt and output
            rp = r.params.repetition_penalty
            want[v] = want[v] * rp if want[v] < 0 else want[v] / rp
        for v in set(r.output_ids):  # then OpenAI's, over generated tokens only
            want[v] -= r.params.frequency_penalty * r.output_ids.count(v) + r.params.presence_penalty
        torch.testing.assert_close(got[i], want)
    # Presence and frequency count generated tokens only: the prompt's token 4 is left alone.
    alone = sampler.penalties.apply(logits, [1], [reqs[1]])[1]
    want = logits[1].clone()
    want[8] += 1.0
    torch.testing.assert_close(alone, want, rtol=0, atol=0)
    # Counts are kept incrementally: two more tokens later, only those are added.
    reqs[0].output_ids += [7, 11]
    again = sampler.penalties.apply(logits, [0], [reqs[0]])[0]
    for v, n in ((5, 3), (7, 2), (11, 1)):
        assert math.isclose(float(logits[0, v] - again[v]), 0.25 * n + 0.5, rel_tol=1e-6)
    sampler.release(reqs[0])
    sampler.release(reqs[1])
    sampler.release(reqs[2])
    assert sampler.penalties.rows_held == 0


def test_greedy_rows_get_penalties_too():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    r = _with_history([0], [1], frequency_penalty=2.0)  # token 1 was generated: 5 - 2 < 4
    assert Sampler().sample(logits, [r]).tokens == [2]


def test_a_row_with_non_finite_logits_fails_alone():
    logits = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    logits[1, 3] = float("nan")
    logits[2, :] = float("-inf")
    reqs = [Request(f"r{i}", [1], SamplingParams(temperature=t), seed=i) for i, t in enumerate((0, 1.0, 0.5, 0.8))]
    reqs[3].return_logprobs = True
    out = Sampler().sample(logits, reqs)
    assert out.tokens[1] is None and out.tokens[2] is None
    assert out.tokens[0] == int(logits[0].argmax())
    assert out.tokens[3] is not None and out.logprobs[3] == pytest.approx(
        float(torch.log_softmax(logits[3], -1)[out.tokens[3]]), abs=1e-6
    )
