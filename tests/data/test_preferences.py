"""Preference data (lmforge.data.preferences): a shared prompt, and labels only on each completion."""

from __future__ import annotations

from lmforge.data.preferences import encode_preference, encode_preferences
from lmforge.data.records import Preference
from lmforge.tokenizer import IM_END
from lmforge.train.losses import IGNORE_INDEX


def test_preference_encoding_labels_only_the_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    pair = Preference([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What reads?"}],
                      "the model reads.", "a token counts the answer.")
    ex = encode_preference(tok, pair, 512)
    p = ex.prompt_len
    assert ex.chosen_ids[:p] == ex.rejected_ids[:p]
    assert tok.decode(ex.chosen_ids[:p]) == tok.apply_chat_template(pair.prompt, add_generation_prompt=True)
    assert all(lab == IGNORE_INDEX for lab in ex.chosen_labels[:p] + ex.rejected_labels[:p])
    assert ex.chosen_labels[p:] == ex.chosen_ids[p:] and ex.rejected_labels[p:] == ex.rejected_ids[p:]
    assert tok.decode(ex.chosen_ids[p:]) == "the model reads." + IM_END
    assert tok.decode(ex.rejected_ids[p:]) == "a token counts the answer." + IM_END
    assert encode_preference(tok, pair, p) is None  # too long
    enc = encode_preferences(tok, [pair, pair], p)
    assert enc.dropped == 2 and "dropped 2 of 2 preference pairs" in enc.summary()
