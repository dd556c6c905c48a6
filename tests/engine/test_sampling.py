"""Sampling: every logits processor on hand-made numbers, the pipeline order, parameter validation, and
chi-square tests that the sampler draws from exactly the filtered softmax it claims to."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from lmforge.engine.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    make_generator,
    min_p_filter,
    penalty_window,
    process_logits,
    sample,
    sample_from,
    token_counts,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)

NEG_INF = float("-inf")


def logits_of(probs: list[float]) -> torch.Tensor:
    """(1, V) logits whose softmax is exactly `probs` (up to float32)."""
    return torch.log(torch.tensor([probs], dtype=torch.float64)).float()


def kept(logits: torch.Tensor) -> list[bool]:
    return torch.isfinite(logits[0]).tolist()


# ----------------------------------------------------------------------------------------------------
# Individual processors
# ----------------------------------------------------------------------------------------------------


def test_temperature_worked_example():
    out = apply_temperature(torch.tensor([[2.0, 1.0, 0.0]]), 0.5)
    assert out.tolist() == [[4.0, 2.0, 0.0]]
    assert torch.softmax(out, -1)[0].tolist() == pytest.approx([0.867, 0.117, 0.016], abs=1e-3)
    same = torch.tensor([[2.0, 1.0]])
    assert apply_temperature(same, 1.0) is same


def test_top_k_keeps_ties_and_handles_off_values():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.5]])
    assert top_k_filter(logits, 2).tolist() == [[2.0, 1.0, 1.0, NEG_INF]]
    assert top_k_filter(logits, 1).tolist() == [[2.0, NEG_INF, NEG_INF, NEG_INF]]
    assert top_k_filter(logits, 0) is logits
    assert top_k_filter(logits, 4) is logits
    assert top_k_filter(logits, 100) is logits


def test_top_k_is_per_row():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    assert top_k_filter(logits, 1).tolist() == [[NEG_INF, NEG_INF, 2.0], [2.0, NEG_INF, NEG_INF]]


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.4, [True, False, False, False]),  # the top token alone already reaches 0.4
        (0.75, [True, True, False, False]),  # 0.5 + 0.3 = 0.8 >= 0.75
        (0.85, [True, True, True, False]),  # 0.8 < 0.85 <= 0.95
        (0.99, [True, True, True, True]),
        (1.0, [True, True, True, True]),
        (1e-9, [True, False, False, False]),  # the top token always survives
    ],
)
def test_top_p_worked_example(p, expected):
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(top_p_filter(logits, p)) == expected


def test_top_p_in_shuffled_vocabulary_order_and_per_row():
    # Same probabilities, scattered across the vocabulary, two rows with different orders.
    row0 = logits_of([0.05, 0.5, 0.15, 0.3])
    row1 = logits_of([0.3, 0.15, 0.05, 0.5])
    out = top_p_filter(torch.cat([row0, row1]), 0.75)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True, False, False, True]]
    assert out[0, 1] == row0[0, 1]  # kept logits are unchanged


@pytest.mark.parametrize(
    "min_p, expected",
    [
        (0.0, [True, True, True, True]),
        (0.2, [True, True, True, False]),  # threshold 0.1: 0.15 stays, 0.05 goes
        (0.5, [True, True, False, False]),  # threshold 0.25
        (0.9, [True, False, False, False]),
        (1.0, [True, False, False, False]),
    ],
)
def test_min_p_worked_example(min_p, expected):
    assert kept(min_p_filter(logits_of([0.5, 0.3, 0.15, 0.05]), min_p)) == expected


def test_token_counts_ignore_padding():
    prev = torch.tensor([[5, 2, 5, -1], [-1, -1, -1, 0]])
    assert token_counts(prev, 6).tolist() == [[0, 0, 1, 0, 0, 2], [1, 0, 0, 0, 0, 0]]


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    prev = torch.tensor([[0, 1, 0, -1], [-1, -1, -1, 3]])  # row 0: tokens 0 (twice), 1; row 1: token 3
    out = apply_repetition_penalty(logits, prev, 2.0)
    # positive -> divided, negative -> multiplied, once however often the token occurred; padding is no token
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.5, 1.5]]
    assert apply_repetition_penalty(logits, prev, 1.0) is logits


def test_presence_frequency_hand_computed():
    logits = torch.ones(2, 4)
    prev = torch.tensor([[2, 2, 1, -1, -1], [-1, -1, -1, -1, -1]])
    out = apply_presence_frequency(logits, prev, 0.5, 0.25)
    # row 0 counts [0, 1, 2, 0]: 1 - 0.5 - 0.25 * count for present tokens; row 1 is all padding
    assert out.tolist() == [[1.0, 0.25, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    # negative penalties encourage repetition
    assert apply_presence_frequency(logits, prev, 0.0, -1.0)[0].tolist() == [1.0, 2.0, 3.0, 1.0]
    assert apply_presence_frequency(logits, prev, 0.0, 0.0) is logits


def test_logit_bias():
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    out = apply_logit_bias(logits, {0: 5.0, 2: -1.0})
    assert out.tolist() == [[5.0, 1.0, 1.0], [6.0, 1.0, 0.0]]
    assert apply_logit_bias(logits, {1: NEG_INF})[:, 1].tolist() == [NEG_INF, NEG_INF]
    assert apply_logit_bias(logits, None) is logits
    assert apply_logit_bias(logits, {}) is logits
    for bad in (3, -1, 10**9):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            apply_logit_bias(logits, {bad: 1.0})


def test_penalty_window_is_right_aligned():
    assert penalty_window([[7, 8, 9], [4]], 2).tolist() == [[8, 9], [-1, 4]]
    assert penalty_window([[7, 8, 9], [4]], -1).tolist() == [[7, 8, 9], [-1, -1, 4]]
    assert penalty_window([[7, 8, 9], [4]], 0).shape == (2, 0)
    assert penalty_window([[], []], -1).shape == (2, 0)


def test_token_logprobs_from_raw_logits():
    raw = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    chosen_lp, top_ids, top_lp = token_logprobs(raw, torch.tensor([0, 0]), 1)
    assert chosen_lp.tolist() == pytest.approx([math.log(0.25), math.log(0.75)], abs=1e-6)
    assert top_ids.tolist() == [[1], [0]]
    assert top_lp[:, 0].tolist() == pytest.approx([math.log(0.75)] * 2, abs=1e-6)
    chosen_lp, top_ids, top_lp = token_logprobs(raw, torch.tensor([1, 1]), 0)
    assert top_ids.shape == (2, 0) and top_lp.shape == (2, 0)
    with pytest.raises(ValueError):
        token_logprobs(raw, torch.tensor([1, 1]), 3)


# ----------------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------------


def test_greedy_equals_top_k_1_equals_temperature_0():
    torch.manual_seed(0)
    logits = torch.randn(16, 50)
    argmax = logits.argmax(-1)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(sample(logits, temperature=0.0), argmax)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1, generator=gen), argmax)
    assert torch.equal(sample(logits, temperature=5.0, min_p=1.0, generator=gen), argmax)
    greedy = SamplingParams(temperature=0.0)
    assert greedy.greedy and not SamplingParams().greedy
    assert torch.equal(sample_from(logits, greedy), argmax)
    assert torch.equal(sample_from(logits, SamplingParams(temperature=1.0, top_k=1), generator=gen), argmax)


def test_sample_keeps_leading_shape():
    logits = torch.randn(2, 3, 10)
    assert sample(logits, temperature=0.0).shape == (2, 3)
    assert sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(0)).shape == (2, 3)


def test_greedy_still_applies_penalties_and_bias():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    prev = torch.tensor([[0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)  # 3 / 2 = 1.5 < 2
    assert sample_from(logits, params, prev).tolist() == [1]
    params = SamplingParams(temperature=0.0, logit_bias={2: 10.0})
    assert sample_from(logits, params).tolist() == [2]


def test_process_logits_order_and_window():
    logits = torch.tensor([[2.0, 1.0, 1.0, -1.0]])
    prev = torch.tensor([[0, 1, 3, 3]])
    params = SamplingParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=2.0,
                            presence_penalty=0.5, frequency_penalty=0.25, repeat_last_n=2, logit_bias={2: 1.0})
    # window = last 2 tokens = [3, 3]: only token 3 is penalised.
    # token 3: -1 * 2 (repetition) - 0.5 (presence) - 2 * 0.25 (frequency) = -3; token 2: +1 bias; then / 0.5
    expected = [[4.0, 2.0, 4.0, -6.0]]
    assert process_logits(logits, params, prev).tolist() == expected
    # repeat_last_n -1 looks at everything, 0 at nothing
    whole = process_logits(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                                   repetition_penalty=2.0, repeat_last_n=-1), prev)
    assert whole.tolist() == [[1.0, 0.5, 1.0, -2.0]]
    off = process_logits(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                                repetition_penalty=2.0, repeat_last_n=0), prev)
    assert off.tolist() == logits.tolist()


def test_top_p_sees_the_tempered_distribution():
    # At T=1 probs are [0.5, 0.3, 0.15, 0.05]: top_p 0.75 keeps two. At T=0.5 the top token has
    # 0.25 / (0.25 + 0.09 + 0.0225 + 0.0025) = 0.686 and two tokens still reach 0.75 ...
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    base = dict(top_k=0, min_p=0.0, top_p=0.6)
    assert kept(process_logits(logits, SamplingParams(temperature=1.0, **base))) == [True, True, False, False]
    # ... but with top_p 0.6 the tempered top token alone suffices (0.686 >= 0.6) while at T=1 it does not.
    assert kept(process_logits(logits, SamplingParams(temperature=0.5, **base))) == [True, False, False, False]


def test_everything_banned_is_a_clear_error():
    params = SamplingParams(temperature=1.0, logit_bias={0: NEG_INF, 1: NEG_INF})
    with pytest.raises(ValueError, match="every token was excluded"):
        sample_from(torch.zeros(1, 2), params, generator=torch.Generator().manual_seed(0))


def test_seeded_sampling_is_reproducible():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)

    def run(seed: int) -> list[list[int]]:
        gen = make_generator(seed)
        return [sample_from(logits, params, generator=gen).tolist() for _ in range(20)]

    assert run(123) == run(123)
    assert run(123) != run(124)
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(sample(logits, generator=gen_a), sample(logits, generator=gen_b))


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


def test_defaults_validate_and_chain():
    params = SamplingParams()
    assert params.validate() is params
    defaults = (params.temperature, params.top_k, params.top_p, params.min_p, params.repeat_last_n)
    assert defaults == (0.8, 40, 0.9, 0.05, 64)  # Ollama / llama.cpp
    SamplingParams(num_beams=4, temperature=0.0).validate()
    SamplingParams(logprobs=0).validate()
    SamplingParams(logprobs=20, logit_bias={5: NEG_INF, 6: 100.0}, repeat_last_n=-1).validate()


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", -5),
        ("max_new_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("nan")),
        ("presence_penalty", float("nan")),
        ("frequency_penalty", float("nan")),
        ("frequency_penalty", float("-inf")),
        ("num_beams", 0),
        ("logprobs", -1),
        ("logprobs", 21),
        ("repeat_last_n", -2),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {1: float("nan")}),
        ("stop", [""]),
        ("stop", "END"),
        ("stop_token_ids", [-3]),
        ("length_penalty", float("nan")),
    ],
)
def test_validate_rejects(field, value):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value}).validate()
    assert "\n" not in str(info.value)


def test_beams_require_greedy():
    with pytest.raises(ValueError, match=r"beam search is deterministic; set temperature 0.*num_beams"):
        SamplingParams(num_beams=2).validate()  # the default temperature 0.8 is sampling
    with pytest.raises(ValueError, match="num_beams"):
        SamplingParams(num_beams=3, temperature=1.0, top_k=0).validate()


# ----------------------------------------------------------------------------------------------------
# Statistics: the sampler draws from exactly the filtered softmax
# ----------------------------------------------------------------------------------------------------

LOGITS8 = np.array([2.0, 1.5, 1.2, 0.8, 0.3, 0.0, -0.5, -1.0])


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """An independent, loop-based float64 restatement of the documented pipeline (not the code under test)."""
    z = logits / temperature
    keep = np.ones(len(z), dtype=bool)
    if top_k > 0:
        kth = np.sort(z)[::-1][top_k - 1]
        keep &= z >= kth

    def probs() -> np.ndarray:
        e = np.where(keep, np.exp(z - z.max()), 0.0)
        return e / e.sum()

    if top_p < 1.0:
        q, mass = probs(), 0.0
        for i in sorted(range(len(z)), key=lambda i: -q[i]):
            if not keep[i]:
                continue
            if mass >= top_p:
                keep[i] = False
            mass += q[i]
    if min_p > 0.0:
        q = probs()
        keep &= q >= min_p * q.max()
    return probs()


@pytest.mark.parametrize(
    "settings, n_kept",
    [
        (dict(temperature=0.7), 8),
        (dict(temperature=1.0, top_k=3), 3),
        (dict(temperature=1.0, top_p=0.8), 4),  # cumulative 0.732 before the 4th token, 0.840 after
        (dict(temperature=1.0, min_p=0.2), 4),  # 5th token has 0.183 of the top probability
        (dict(temperature=1.3, top_k=6, top_p=0.9, min_p=0.3), 4),  # each filter removes something
        (dict(temperature=0.6, top_k=5, top_p=0.8, min_p=0.05), 3),
    ],
)
def test_chi_square_against_filtered_softmax(settings, n_kept):
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | settings
    expected = reference_probs(LOGITS8, **full)
    support = expected > 0
    assert support.sum() == n_kept  # the settings really exercise the filter they name

    n = 20_000
    logits = torch.tensor(LOGITS8, dtype=torch.float32).expand(n, -1)
    ids = sample_from(logits, SamplingParams(**full), generator=torch.Generator().manual_seed(1234))
    counts = np.bincount(ids.numpy(), minlength=len(LOGITS8))

    assert counts[~support].sum() == 0  # nothing is ever drawn outside the kept set
    if n_kept > 1:
        result = chisquare(counts[support], n * expected[support])
        assert result.pvalue > 1e-3, (counts, n * expected)


def test_sample_from_with_a_generator_per_row_draws_as_each_row_alone():
    """The engine and the scheduler give each request its own random stream: row b of a batch draws what
    it would draw alone with its own generator, whatever the other rows are."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    gens = [make_generator(s) for s in (1, 2, 3)]
    batched = [sample_from(logits, params, generator=gens).tolist() for _ in range(5)]
    for b, seed in enumerate((1, 2, 3)):
        alone = make_generator(seed)
        assert [step[b] for step in batched] == [sample_from(logits[b:b + 1], params, generator=alone).item()
                                                 for _ in range(5)]
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        sample_from(logits, params, generator=gens[:2])


@pytest.mark.parametrize("settings, plain", [
    (dict(temperature=0.0), True),
    (dict(temperature=0.0, repetition_penalty=1.2), False),
    (dict(temperature=0.0, repetition_penalty=1.2, repeat_last_n=0), True),
    (dict(temperature=0.0, presence_penalty=0.5), False),
    (dict(temperature=0.0, logit_bias={3: 5.0}), False),
    (dict(temperature=0.7), False),
])
def test_plain_greedy_is_the_raw_argmax(settings, plain):
    params = SamplingParams(**settings)
    assert params.plain_greedy is plain
    logits = torch.tensor([[0.0, 2.0, 1.0, 1.9]])
    if plain:  # no history and no generator needed: the argmax of the logits as they are
        assert sample_from(logits, params).tolist() == [1]
