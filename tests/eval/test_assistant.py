"""Assistant metrics on hand-made cases: SQuAD token F1 and likelihood preference accuracy."""

from __future__ import annotations

import pytest

from lmforge.eval.assistant import normalize_answer, token_f1
from lmforge.quickstart import Plan


def test_normalize_drops_case_punctuation_and_articles():
    assert normalize_answer("The Quick, brown fox!") == ["quick", "brown", "fox"]


@pytest.mark.parametrize("pred, ref, f1", [
    ("Return a copy.", "Return a copy.", 1.0),
    ("", "", 1.0),
    ("", "something", 0.0),
    ("nothing shared", "Return the value", 0.0),
    # pred {return, value, now} vs ref {return, value}: P = 2/3, R = 1 -> F1 = 0.8
    ("Return the value now", "Return the value", 0.8),
])
def test_token_f1_by_hand(pred, ref, f1):
    assert token_f1(pred, ref) == pytest.approx(f1)


def test_quickstart_plan_scales_with_the_budget():
    p15, p60 = Plan.for_budget(15), Plan.for_budget(60)
    assert p60.pretrain_steps == 4 * p15.pretrain_steps and p60.sft_steps == 4 * p15.sft_steps
    assert Plan.for_budget(0.01).pretrain_steps >= 10  # never zero steps
