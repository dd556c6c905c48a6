"""Open-book scores by hand: F1 without citations, citation accuracy, "not in the sources" P/R; DPO's
implicit reward as a margin comparison."""

from __future__ import annotations

import math

import pytest

from lmforge.eval.assistant import PairScores, implicit_reward_wins
from lmforge.eval.grounded import says_not_in_sources, score_grounded
from lmforge.retrieval.grounding import NOT_IN_SOURCES


def test_scores_by_hand():
    answers = ["Return the value [2].",          # answerable, right words, right citation
               "Return the value [1]",           # answerable, right words, wrong citation
               "Return the value",               # answerable, no citation
               NOT_IN_SOURCES,                   # absent, said so
               "Open a file [1]."]               # absent, answered anyway
    sources = [2, 2, 2, None, None]
    refs = ["Return the value."] * 3 + ["Compute x.", "Compute y."]
    s = score_grounded(answers, sources, refs, [3] * 5)
    assert s.f1_answerable == pytest.approx(1.0) and s.n_answerable == 3 and s.n == 5
    assert s.citation_accuracy == pytest.approx(1 / 3)
    assert s.nis_precision == pytest.approx(1.0) and s.nis_recall == pytest.approx(0.5)
    assert s.f1_all == pytest.approx((3 * 1.0 + 1.0 + 0.0) / 5)


def test_a_citation_past_the_sources_shown_is_not_a_citation():
    s = score_grounded(["Return the value [7] [2]"], [2], ["Return the value."], [3])
    assert s.citation_accuracy == 1.0  # [7] is ignored, [2] is the first real citation


def test_nothing_said_nothing_absent_gives_nan_not_zero():
    s = score_grounded(["Return the value [1]"], [1], ["Return the value."], [1])
    assert math.isnan(s.nis_precision) and math.isnan(s.nis_recall)


def test_not_in_sources_is_recognised_in_other_words_around_it():
    assert says_not_in_sources("Sorry, that is NOT in the\nsources.") and not says_not_in_sources("It is in the sources")


def test_lengths_must_match():
    with pytest.raises(ValueError):
        score_grounded(["a"], [1, 2], ["a"], [1])


def test_implicit_reward_compares_margins_with_the_reference():
    policy = [PairScores(-10, -12, 0, 0), PairScores(-10, -12, 0, 0)]  # margins 2, 2
    reference = [PairScores(-10, -11, 0, 0), PairScores(-10, -13, 0, 0)]  # margins 1, 3
    assert implicit_reward_wins(policy, reference) == [True, False]
