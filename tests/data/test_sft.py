"""SFT data (lmforge.data.sft): the loss mask through any chat template, and dropping what is too long."""

from __future__ import annotations

import pytest
import tokenizers

from lmforge.data.sft import SFTBatches, encode_conversations, encode_sft
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
