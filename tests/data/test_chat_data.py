"""Chat and preference data: validation with line numbers, the loss mask, dropping, and batches for fit()."""

from __future__ import annotations

import json

import pytest
import tokenizers
import torch

from lmforge.data.chat import (
    Preference,
    PreferenceBatches,
    SFTBatches,
    check_conversation,
    encode_conversations,
    encode_preference,
    encode_preferences,
    encode_sft,
    read_conversations,
    read_preferences,
    train_val_split,
)
from lmforge.errors import UserError
from lmforge.tokenizer import ENDOFTEXT, IM_END, Tokenizer
from lmforge.train.losses import IGNORE_INDEX

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What does the model read?"},
    {"role": "assistant", "content": "the model reads every byte."},
    {"role": "user", "content": "And the cache?"},
    {"role": "assistant", "content": "the cache returns the value 😀."},
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# A template with no end-of-turn token at all: lmforge must add the EOS itself.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# Closes each reply with the EOS, which is also the pad token (the pad == eos trap).
EOS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def labelled_segments(tok: Tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of consecutive labelled tokens (labels aligned with ids)."""
    segments, run = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            run.append(i)
        elif run:
            segments.append(tok.decode(run))
            run = []
    if run:
        segments.append(tok.decode(run))
    return segments


def replies(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


def derived(tok: Tokenizer, **kwargs) -> Tokenizer:
    """A tokenizer on the tiny vocabulary with extra special tokens and other roles/template."""
    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    backend.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    return Tokenizer(backend, **kwargs)


def write_jsonl(path, lines: list) -> str:
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode() + b"\n")
            else:
                f.write(json.dumps(line).encode() + b"\n")
    return str(path)


# ----------------------------------------------------------------------------------------------------
# The loss mask
# ----------------------------------------------------------------------------------------------------


def test_chatml_mask_is_exactly_the_replies_and_their_im_end(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = encode_sft(tok, CHAT, 512)
    assert ex is not None and len(ex.ids) == len(ex.labels)
    assert tok.decode(ex.ids) == tok.apply_chat_template(CHAT)  # nothing added, nothing lost
    assert labelled_segments(tok, ex.ids, ex.labels) == [r + IM_END for r in replies(CHAT)]
    labelled_text = tok.decode([i for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE_INDEX])
    assert "system" not in labelled_text and "user" not in labelled_text and "<|im_start|>" not in labelled_text
    assert sum(lab == tok.eot_id for lab in ex.labels) == 2  # each reply's end of turn is a target
    assert ex.ids[-1] != ex.labels[-1]  # the "\n" after the last <|im_end|> belongs to the next prompt


def test_llama3_style_template_labels_its_own_end_of_turn(tiny_tokenizer):
    tok = derived(tiny_tokenizer, chat_template=LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>",
                  eos_token="<|eot_id|>", eot_token=None, pad_token=None)
    assert tok.pad_id is None
    ex = encode_sft(tok, CHAT, 512)
    assert tok.decode(ex.ids) == tok.apply_chat_template(CHAT)
    assert ex.ids[0] == tok.bos_id and ex.ids.count(tok.bos_id) == 1  # the template's BOS, never doubled
    assert labelled_segments(tok, ex.ids, ex.labels) == [r + "<|eot_id|>" for r in replies(CHAT)]
    batch = SFTBatches([ex], batch_size=2, seed=0, pad_id=tok.pad_id).train_batch(0, 0)
    assert batch["input_ids"].shape == (2, len(ex.ids) - 1)


def test_template_without_end_of_turn_gets_the_eos_appended(tiny_tokenizer):
    tok = derived(tiny_tokenizer, chat_template=PLAIN_TEMPLATE)
    ex = encode_sft(tok, CHAT, 512)
    assert labelled_segments(tok, ex.ids, ex.labels) == [r + ENDOFTEXT for r in replies(CHAT)]
    # The EOS goes right after each reply, before the template's line break; the prompt is untouched.
    rendered = tok.apply_chat_template(CHAT)
    for reply in replies(CHAT):
        rendered = rendered.replace(reply + "\n", reply + ENDOFTEXT + "\n")
    assert tok.decode(ex.ids) == rendered and ex.ids.count(tok.eos_id) == 2
    # The reply starts after the generation prompt's space: "the", not " the" glued to the prompt.
    first = next(j for j, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
    assert tok.decode(ex.ids[:first]).endswith("assistant: ")


def test_pad_equal_to_eos_still_trains_the_real_eos(tiny_tokenizer):
    tok = Tokenizer(tiny_tokenizer.backend, chat_template=EOS_TEMPLATE, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
                    eot_token=None)
    assert tok.pad_id == tok.eos_id
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the data."}]
    ex_short, ex_long = encode_sft(tok, short, 512), encode_sft(tok, CHAT, 512)
    assert labelled_segments(tok, ex_short.ids, ex_short.labels) == ["the data." + ENDOFTEXT]
    data = SFTBatches([ex_short, ex_long], batch_size=2, seed=0, val_examples=[ex_short, ex_long], pad_id=tok.pad_id)
    (batch,) = data.val_batches()
    n = batch["lengths"][0].item()
    assert n == len(ex_short.ids) - 1 < batch["input_ids"].shape[1]
    row_ids, row_labels = batch["input_ids"][0], batch["labels"][0]
    # The real EOS (same id as the padding) is the last target; the padding after it is ignored by position.
    last_target = row_labels[:n][row_labels[:n] != IGNORE_INDEX][-1].item()
    assert last_target == tok.eos_id == tok.pad_id
    assert (row_ids[n:] == tok.pad_id).all() and (row_labels[n:] == IGNORE_INDEX).all()
    assert (batch["labels"][1] == tok.eos_id).sum() == 2  # both replies of the long chat end with a target EOS


def test_a_template_that_is_not_prefix_stable_is_refused(tiny_tokenizer):
    template = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    tok = derived(tiny_tokenizer, chat_template=template)
    with pytest.raises(UserError, match="continuation"):
        encode_sft(tok, CHAT, 512)


def test_too_long_conversations_are_dropped_and_counted(tiny_tokenizer):
    tok = tiny_tokenizer
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok."}]
    n_short, n_long = len(encode_sft(tok, short, 10_000).ids), len(encode_sft(tok, CHAT, 10_000).ids)
    assert encode_sft(tok, CHAT, n_long - 1) is not None  # the last id is only a target: input is n - 1
    assert encode_sft(tok, CHAT, n_long - 2) is None
    enc = encode_conversations(tok, [short, CHAT, short], n_short)
    assert len(enc.examples) == 2 and enc.dropped == 1
    assert enc.summary() == f"dropped 1 of 3 conversations longer than the context ({n_short} tokens)"
    assert "all 3" in encode_conversations(tok, [short, CHAT, short], 10_000).summary()


def test_invalid_conversation_passed_to_encode_sft_is_a_user_error(tiny_tokenizer):
    with pytest.raises(UserError, match="no assistant message"):
        encode_sft(tiny_tokenizer, [{"role": "user", "content": "hi"}], 100)


# ----------------------------------------------------------------------------------------------------
# Reading conversations
# ----------------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}]}


def test_each_bad_conversation_record_is_reported_with_its_line(tmp_path):
    u, a = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "r"})
    lines = [
        GOOD,  # 1
        "{not json",  # 2
        [1, 2],  # 3
        {"text": "hi"},  # 4
        {"messages": [u, {"role": "bot", "content": "x"}]},  # 5
        {"messages": [u, {"role": "assistant", "content": ["x"]}]},  # 6
        {"messages": [u, {"role": "assistant", "content": "  "}]},  # 7
        {"messages": [u]},  # 8
        {"messages": [u, a, {"role": "system", "content": "s"}, u, a]},  # 9
        "",  # 10: blank lines are skipped silently
        b"\xff\xfe not utf-8",  # 11
        {"messages": [a, u, a]},  # 12
        {"messages": [u, u, a]},  # 13
        {"messages": [u, a, u]},  # 14
        {"messages": []},  # 15
        {"messages": [{"role": "system", "content": "s"}, u, a], "id": 7},  # 16: extra keys are fine
        {"messages": [u, {"role": "assistant"}]},  # 17
    ]
    data = read_conversations(write_jsonl(tmp_path / "chat.jsonl", lines))
    assert len(data) == 2 and data.records == 16
    reasons = dict(data.problems)
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 17]
    expect = {
        2: "not valid JSON", 3: "expected a JSON object", 4: 'no "messages"', 5: "unknown role 'bot'",
        6: "non-string content", 7: "empty assistant reply", 8: "no assistant message", 9: "only the first",
        11: "not valid UTF-8", 12: "must start with a user message", 13: "must alternate", 14: "ends with the assistant",
        15: "empty list", 17: "non-string content (no content)",
    }
    for line, needle in expect.items():
        assert needle in reasons[line], (line, reasons[line])
    assert data.summary().startswith(f"{tmp_path / 'chat.jsonl'}: 2 conversations from 16 records; skipped 14: line 2:")
    assert data.conversations[1] == [{"role": "system", "content": "s"}, u, a]


def test_a_file_without_usable_records_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["nope", {"messages": "x"}])
    with pytest.raises(UserError, match=r"bad\.jsonl: no usable conversation in 2 records: line 1: not valid JSON"):
        read_conversations(path)
    with pytest.raises(UserError, match="no records"):
        read_conversations(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(UserError, match="does not exist"):
        read_conversations(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="preference data"):
        read_conversations("builtin:pydocs-prefs")
    with pytest.raises(UserError, match="unknown split"):
        read_conversations("builtin:pydocs-qa:test")
    with pytest.raises(UserError, match="unknown built-in"):
        read_conversations("builtin:nope")


def test_limit_and_builtin_specs():
    data = read_conversations("builtin:pydocs-qa:heldout", limit=5)
    assert len(data) == 5 and check_conversation(data.conversations[0]) is None
    assert len(read_conversations("builtin:pydocs-qa")) == len(read_conversations("builtin:pydocs-qa:train"))


def test_train_val_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, val = train_val_split(items, val_fraction=0.1, seed=3)
    assert (train, val) == train_val_split(items, val_fraction=0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items
    assert train_val_split([1], val_fraction=0.1) == ([1], [])


# ----------------------------------------------------------------------------------------------------
# Preferences
# ----------------------------------------------------------------------------------------------------


def test_preference_formats_and_bad_records(tmp_path):
    u = {"role": "user", "content": "q"}
    lines = [
        {"prompt": "What is it?", "chosen": "A cache.", "rejected": "A dog."},  # 1
        {"prompt": [{"role": "system", "content": "s"}, u], "chosen": [{"role": "assistant", "content": "yes."}],
         "rejected": [{"role": "assistant", "content": "no."}]},  # 2: TRL conversational
        {"chosen": [u, {"role": "assistant", "content": "yes."}], "rejected": [u, {"role": "assistant", "content": "no."}]},  # 3
        {"prompt": "q", "chosen": "same", "rejected": "same"},  # 4
        {"prompt": "q", "chosen": "", "rejected": "x"},  # 5
        {"chosen": "a", "rejected": "b"},  # 6
        {"prompt": [u, {"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"},  # 7
        {"prompt": "q", "chosen": "a"},  # 8
        {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},  # 9
        {"prompt": 5, "chosen": "a", "rejected": "b"},  # 10
        {"prompt": "  ", "chosen": "a", "rejected": "b"},  # 11
        {"prompt": "q", "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "a"}],
         "rejected": "b"},  # 12
    ]
    data = read_preferences(write_jsonl(tmp_path / "prefs.jsonl", lines))
    assert [p.chosen for p in data.pairs] == ["A cache.", "yes.", "yes."]
    assert data.pairs[0].prompt == [{"role": "user", "content": "What is it?"}]
    assert data.pairs[1].prompt[0]["role"] == "system" and data.pairs[2].prompt == [u]
    reasons = dict(data.problems)
    expect = {4: "the same reply", 5: 'empty "chosen"', 6: 'no "prompt"', 7: "must end with a user message",
              8: 'no "rejected"', 9: "must be the assistant's reply", 10: '"prompt" must be a string',
              11: "empty prompt", 12: "differ from the prompt"}
    assert sorted(reasons) == sorted(expect)
    for line, needle in expect.items():
        assert needle in reasons[line], (line, reasons[line])
    with pytest.raises(UserError, match="no usable preference pair"):
        read_preferences(write_jsonl(tmp_path / "bad.jsonl", [lines[3]]))
    with pytest.raises(UserError, match="conversation data"):
        read_preferences("builtin:pydocs-qa")


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


# ----------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------


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
