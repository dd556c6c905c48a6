"""SFT and preference batches for fit() (lmforge.data.batching): pure functions of (seed, step, micro),
right-padded, labels masked by position."""

from __future__ import annotations

import pytest
import torch

from lmforge.data.preferences import PreferenceBatches, encode_preferences
from lmforge.data.records import Preference
from lmforge.data.sft import SFTBatches, encode_sft
from lmforge.errors import UserError
from lmforge.train.losses import IGNORE_INDEX


def _examples(tok, n=11):
    subjects = ["the model", "a token", "the cache", "our loss", "each layer"]
    out = []
    for i in range(n):
        chat = [{"role": "user", "content": f"q {i}"},
                {"role": "assistant", "content": " ".join(subjects[: 1 + i % 5]) + "."}]
        out.append(encode_sft(tok, chat, 512))
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_batches_are_pure_functions_of_seed_step_micro(tiny_tokenizer):
    examples = _examples(tiny_tokenizer)
    make = lambda seed: SFTBatches(examples, batch_size=3, grad_accum=2, seed=seed, val_examples=examples[:4])  # noqa: E731
    a, b = make(7), make(7)
    later = b.train_batch(40, 1)  # visiting batches in another order changes nothing
    assert _same(a.train_batch(40, 1), later)
    assert all(_same(a.train_batch(s, m), b.train_batch(s, m)) for s in range(5) for m in range(2))
    assert not all(_same(a.train_batch(s, 0), make(8).train_batch(s, 0)) for s in range(3))
    # Each epoch is a permutation: the first 11 examples drawn cover every example once.
    seen = [i for s in range(2) for m in range(2) for i in a.train_batch(s, m)["index"].tolist()]
    assert sorted(seen[:11]) == list(range(11))
    assert a.steps_per_epoch == 2 and a.tokens_per_batch > 0

    batch = a.train_batch(3, 0)
    for row, i in enumerate(batch["index"].tolist()):
        ex, n = examples[i], len(examples[i].ids) - 1
        assert batch["lengths"][row] == n and batch["attention_mask"][row].sum() == n
        assert batch["input_ids"][row, :n].tolist() == ex.ids[:-1]
        assert batch["labels"][row, :n].tolist() == ex.labels[1:]  # shifted: labels[t] is the target of t
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][row, n:] == 0).all()
    vals = a.val_batches()
    assert [v["index"].tolist() for v in vals] == [[0, 1, 2], [3]] and vals is a.val_batches()


def test_preference_batches_share_one_width(tiny_tokenizer):
    tok = tiny_tokenizer
    pairs = [Preference([{"role": "user", "content": f"q{i}"}], "the model reads." * (1 + i % 3), "no.") for i in range(5)]
    examples = encode_preferences(tok, pairs, 512).examples
    data = PreferenceBatches(examples, batch_size=4, seed=1, val_examples=examples)
    batch = data.train_batch(2, 0)
    assert _same(batch, PreferenceBatches(examples, batch_size=4, seed=1).train_batch(2, 0))
    width = batch["chosen_input_ids"].shape[1]
    assert all(batch[k].shape == (4, width) for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                                       "rejected_labels", "chosen_attention_mask"))
    for row, i in enumerate(batch["index"].tolist()):
        ex = examples[i]
        n = len(ex.rejected_ids) - 1
        assert batch["rejected_labels"][row, :n].tolist() == ex.rejected_labels[1:]
        assert (batch["rejected_labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["prompt_lens"][row] == ex.prompt_len
    assert [len(v["index"]) for v in data.val_batches()] == [4, 1]


def test_batches_refuse_empty_data():
    with pytest.raises(UserError, match="no conversations"):
        SFTBatches([], batch_size=2)


def test_length_grouping_pads_less_covers_every_example_and_stays_pure(tiny_tokenizer):
    from lmforge.data.batching import LENGTH_GROUP

    tok = tiny_tokenizer
    examples = [encode_sft(tok, [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "the model reads " * (1 + (i * 7) % 23)}], 512)
                for i in range(97)]
    make = lambda group: SFTBatches(examples, batch_size=4, seed=3, group_by_length=group)  # noqa: E731
    plain, grouped, again = make(False), make(True), make(True)
    n_batches = LENGTH_GROUP * 3
    assert all(_same(grouped.train_batch(s, 0), again.train_batch(s, 0)) for s in (5, 0, 47, 5))

    def padded(data):
        return sum(data.train_batch(s, 0)["input_ids"].numel() for s in range(n_batches))

    assert padded(grouped) < 0.8 * padded(plain)
    # a window of LENGTH_GROUP batches holds the same examples either way: only their grouping changes
    for w in range(3):
        steps = range(w * LENGTH_GROUP, (w + 1) * LENGTH_GROUP)
        idx = lambda d: sorted(i for s in steps for i in d.train_batch(s, 0)["index"].tolist())  # noqa: E731
        assert idx(grouped) == idx(plain)
