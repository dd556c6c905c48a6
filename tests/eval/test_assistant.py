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


def test_preference_wins_sum_and_per_token_by_hand(tiny_tokenizer, tmp_path):
    """Each pair's verdicts equal the summed and the mean log-likelihoods computed by hand."""
    import torch

    from conftest import save_tiny_model
    from lmforge.data.preferences import encode_preference
    from lmforge.data.records import Preference
    from lmforge.eval.assistant import preference_accuracy, preference_wins
    from lmforge.loaders.auto import load

    loaded = load(save_tiny_model(tmp_path / "m", tiny_tokenizer, embedding_scale=4.0))
    model, tok = loaded.model.eval(), loaded.tokenizer
    pairs = [Preference([{"role": "user", "content": "say it"}], "the model reads the value.", "the model"),
             Preference([{"role": "user", "content": "go"}], "a token", "each layer learns the next word."),
             Preference([{"role": "user", "content": "x"}], "the data", "the cache")]
    examples = [encode_preference(tok, p, 64) for p in pairs]
    wins = preference_wins(model, tok, examples)

    def scores(ids, labels):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
        # labels are aligned with the ids: the logits at t - 1 predict the token at t
        picked = [logp[t - 1, y].item() for t, y in enumerate(labels) if y != -100 and t > 0]
        return sum(picked), sum(picked) / len(picked)

    for ex, (win_sum, win_mean) in zip(examples, wins):
        c, r = scores(ex.chosen_ids, ex.chosen_labels), scores(ex.rejected_ids, ex.rejected_labels)
        assert win_sum == (c[0] > r[0]) and win_mean == (c[1] > r[1])
    assert preference_accuracy(model, tok, examples) == pytest.approx(sum(w[0] for w in wins) / 3)
    assert preference_accuracy(model, tok, examples, normalize=True) == pytest.approx(sum(w[1] for w in wins) / 3)
