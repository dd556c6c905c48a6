"""Supervised fine-tuning data: render a conversation with the chat template, label the assistant replies
(the loss mask), drop what does not fit the context, and batch for `fit()`.

The conversations come from :mod:`lmforge.data.records`; the batching shared with preference data (seeded,
resumable, right-padded, the pad == eos trap) is :mod:`lmforge.data.batching`.

The loss mask
-------------
`encode_sft` renders the conversation with the tokenizer's own chat template (any Hugging Face Jinja
template) and labels exactly the tokens of each assistant reply *and the token(s) that close it* (for
ChatML ``<|im_end|>``), so a fine-tuned model learns to stop. Everything else is `IGNORE_INDEX`: the
system and user turns and the role headers (``<|im_start|>assistant\\n``), which the inference prompt
already contains. The spans are found generically: for assistant turn *i* the template renders
``messages[:i]`` with ``add_generation_prompt=True`` (the text a model sees before it answers) and
``messages[:i+1]``; the characters between the two are the reply as the template writes it. Each must be
a prefix of the next and of the whole conversation (true of every sane template; one that breaks it is a
`UserError`, because there is then no way to tell which tokens the model produced). The rendered text
is tokenized with character offsets, in pieces cut at the start of each reply (so a reply's tokens are
exactly the ones a model produces after its prompt at inference; with ChatML's special tokens the cut
changes nothing), and the tokens inside a reply's span are labelled, minus the whitespace a template adds
after the closing token (ChatML's ``"\\n"`` after ``<|im_end|>`` belongs to the next prompt). If a reply
does not end with one of `Tokenizer.eos_ids` (a template without an end-of-turn token), the EOS id is
inserted right after it and labelled, or generation would never stop. Literal special-token text inside a
message (``"<|im_end|>"``) becomes the control token, exactly as in `Tokenizer.encode_chat` and
transformers; data that contains such text should be cleaned first.

**Too long: dropped, not truncated.** A conversation whose tokens do not fit the context is dropped and
counted ("dropped 3 of 120 conversations longer than the context (256 tokens)"). Truncating from the left
cuts off the question (the reply then answers nothing, and the system prompt is lost); truncating from
the right cuts off the end of the reply and its end-of-turn token, teaching the model to stop mid-sentence
or never. Neither is what the user asked for, so we keep only whole conversations and say how many went.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from lmforge.data.batching import IGNORE_INDEX, ExampleBatches, shift_and_pad
from lmforge.data.records import ChatData, check_conversation, clean_messages
from lmforge.errors import UserError

__all__ = [
    "SFTExample",
    "Encoded",
    "EncodedSFT",
    "SFTBatches",
    "encode_sft",
    "encode_conversations",
    "encode_completion",
    "check_max_len",
    "fits_context",
]


@dataclass(frozen=True)
class SFTExample:
    """Token ids of one rendered conversation and their labels, *aligned* (not shifted): ``labels[t]`` is
    ``ids[t]`` where the token belongs to an assistant reply or its end-of-turn, else `IGNORE_INDEX`."""

    ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------------------------------
# Rendering through the chat template, and the loss mask
# ----------------------------------------------------------------------------------------------------


def _stop_id(tokenizer: Any) -> int:
    """The id appended after a reply whose template does not close it with an EOS/EOT token."""
    if tokenizer.eos_id is not None:
        return tokenizer.eos_id
    if tokenizer.eos_ids:
        return tokenizer.eos_ids[0]
    raise UserError("the tokenizer has no EOS token, so a fine-tuned model could not learn to stop; "
                    "give it an eos_token in tokenizer_config.json")


def _render(tokenizer: Any, messages: list[dict], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=gen)


def _prefix_error(turn: int, what: str) -> UserError:
    return UserError(
        f"the chat template does not render assistant turn {turn} as a continuation of {what}, so the "
        "assistant tokens cannot be located for the loss mask; use a template that renders a conversation "
        "as a prefix of any longer one"
    )


def _assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span [start, end) of each assistant reply as the template
    writes it (from just after the generation prompt to the end of the turn)."""
    full = _render(tokenizer, messages, False)
    spans = []
    indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for n, i in enumerate(indices, start=1):
        before = _render(tokenizer, messages[:i], True)
        through = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False)
        if not through.startswith(before):
            raise _prefix_error(n, "its prompt (rendered with add_generation_prompt=True)")
        if not full.startswith(through):
            raise _prefix_error(n, "the conversation before it, within the whole conversation")
        spans.append((len(before), len(through)))
    return full, spans


def _encode_pieces(tokenizer: Any, text: str, cuts: Sequence[tuple[int, int | None]]
                   ) -> tuple[list[int], list[tuple[int, int]], set[int]]:
    """Token ids of `text` tokenized piecewise between the cut positions, each token's character span in
    `text`, and the positions of inserted ids: a cut ``(pos, id)`` with an id inserts that id at ``pos``."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    inserted: set[int] = set()
    prev = 0
    for pos, insert in [*sorted(cuts, key=lambda c: c[0]), (len(text), None)]:
        if pos > prev:
            enc = tokenizer.backend.encode(text[prev:pos], add_special_tokens=False)
            ids.extend(enc.ids)
            offsets.extend((prev + a, prev + b) for a, b in enc.offsets)
        if insert is not None:
            inserted.add(len(ids))
            ids.append(insert)
            offsets.append((pos, pos))
        prev = max(prev, pos)
    return ids, offsets, inserted


def _reply_end(text: str, start: int, end: int) -> int:
    """Where the reply span [start, end) really ends: before the whitespace a template writes after the
    turn (ChatML's "\n" after <|im_end|>), which belongs to the next prompt, not to the reply."""
    return start + len(text[start:end].rstrip())


def _sft(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, aligned labels) for a validated conversation; see "The loss mask" in the module docstring.

    The text is tokenized in pieces cut at the start of every reply, so a reply's tokens are exactly those
    a model produces after the prompt at inference (which encodes the prompt on its own): with a template
    whose generation prompt ends in a space ("Assistant: "), one tokenization of the whole text would glue
    that space to the reply's first word. Where a reply has no end-of-turn token, a cut at its end inserts
    the EOS (so it also stays apart from the template's line break: ".\n" is often one token).
    """
    text, spans = _assistant_spans(tokenizer, messages)
    spans = [(s, _reply_end(text, s, e)) for s, e in spans]
    eos = set(tokenizer.eos_ids)
    cuts: list[tuple[int, int | None]] = []
    for n, (s, e) in enumerate(spans, start=1):
        reply = tokenizer.backend.encode(text[s:e], add_special_tokens=False).ids
        if not reply:
            raise UserError(f"the chat template rendered assistant turn {n} as nothing (does it drop replies?)")
        cuts.append((s, None))
        if reply[-1] not in eos:
            cuts.append((e, _stop_id(tokenizer)))  # no end-of-turn token from the template: add the EOS
    ids, offsets, inserted = _encode_pieces(tokenizer, text, cuts)
    labels = [IGNORE_INDEX] * len(ids)
    for j in inserted:
        labels[j] = ids[j]
    k = 0
    for j, (a, b) in enumerate(offsets):  # tokens and spans are both in text order
        if j in inserted or b <= a:
            continue
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        if k < len(spans) and spans[k][0] <= a and b <= spans[k][1]:
            labels[j] = ids[j]
    return ids, labels


# ----------------------------------------------------------------------------------------------------
# Encoding, and dropping what does not fit the context
# ----------------------------------------------------------------------------------------------------


def fits_context(n_ids: int, max_len: int) -> bool:
    # The model reads ids[:-1] and predicts ids[1:]: the last id is only ever a target.
    return n_ids - 1 <= max_len


def check_max_len(max_len: int) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise UserError(f"the maximum length must be a positive integer, got {max_len!r}")


def encode_sft(tokenizer: Any, messages: list[dict], max_len: int) -> SFTExample | None:
    """Render `messages` with the tokenizer's chat template, tokenize, and label the assistant replies.

    Returns None when the conversation does not fit `max_len` (the model's context length: the input,
    every id but the last, must have at most `max_len` tokens). Raises `UserError` for an invalid
    conversation (see `check_conversation`) or a template whose renders are not prefixes of each other.
    No BOS is added: the template owns every special token of a chat, as in `Tokenizer.encode_chat`.
    """
    check_max_len(max_len)
    reason = check_conversation(messages)
    if reason:
        raise UserError(f"cannot train on this conversation: {reason}")
    ids, labels = _sft(tokenizer, clean_messages(messages))
    if not fits_context(len(ids), max_len):
        return None
    return SFTExample(ids, labels)


def encode_completion(tokenizer: Any, prompt: list[dict], reply: str) -> tuple[str, list[int]]:
    """The prompt text (with the generation prompt) and the reply's token ids as the template closes it."""
    messages = prompt + [{"role": "assistant", "content": reply}]
    before = _render(tokenizer, prompt, True)
    through = _render(tokenizer, messages, False)
    if not through.startswith(before):
        raise _prefix_error(1, "its prompt (rendered with add_generation_prompt=True)")
    text = through[len(before):]
    text = text[: _reply_end(text, 0, len(text))]
    ids = tokenizer.backend.encode(text, add_special_tokens=False).ids
    if not ids:
        raise UserError("the chat template rendered the assistant reply as nothing (does it drop replies?)")
    if ids[-1] not in set(tokenizer.eos_ids):
        ids.append(_stop_id(tokenizer))
    return before, ids


@dataclass
class Encoded:
    """Encoded examples that fit the context, and how many were dropped because they did not."""

    examples: list
    total: int
    max_len: int
    what: str = "conversations"  # or "preference pairs": how the summary names them

    @property
    def dropped(self) -> int:
        return self.total - len(self.examples)

    def summary(self) -> str:
        if self.dropped:
            return (f"dropped {self.dropped} of {self.total} {self.what} longer than the context "
                    f"({self.max_len} tokens)")
        return f"all {self.total} {self.what} fit the context ({self.max_len} tokens)"


EncodedSFT = Encoded  # list[SFTExample]


def encode_conversations(tokenizer: Any, conversations: ChatData | Iterable[list[dict]], max_len: int) -> EncodedSFT:
    """`encode_sft` over many conversations; too-long ones are dropped and counted (see `EncodedSFT.summary`)."""
    convs = conversations.conversations if isinstance(conversations, ChatData) else list(conversations)
    examples = [ex for ex in (encode_sft(tokenizer, m, max_len) for m in convs) if ex is not None]
    return Encoded(examples, len(convs), max_len)


# ----------------------------------------------------------------------------------------------------
# Batches for fit()
# ----------------------------------------------------------------------------------------------------


class SFTBatches(ExampleBatches):
    """`DataSource` of supervised fine-tuning batches (see `lmforge.data.batching` for why there is no packing).

    ``train_batch(step, micro)`` -> dict of
      * ``input_ids``  (B, T) long: right-padded with `pad_id` (any id works: padding sits after every real
        token, so the causal mask already hides it, and its labels are ignored),
      * ``labels``     (B, T) long: the target of each position (already shifted), IGNORE_INDEX off the
        assistant replies and on padding,
      * ``attention_mask`` (B, T) long: 1 on real tokens, 0 on padding; ``lengths`` (B,) long,
      * ``index``      (B,) long: each row's position in `examples` (or `val_examples`), e.g. for caching.
    T is the longest input of the batch. Batches are a pure function of (seed, step, micro), and
    `val_batches()` covers `val_examples` once, in order (see `ExampleBatches`).
    """

    what = "conversations"

    @staticmethod
    def input_tokens(example: SFTExample) -> int:
        return len(example.ids) - 1

    def _collate(self, items: Sequence[SFTExample], index: Sequence[int]) -> dict[str, torch.Tensor]:
        input_ids, labels, lengths = shift_and_pad([e.ids for e in items], [e.labels for e in items], self.pad_id)
        mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "lengths": lengths,
                "index": torch.tensor(list(index), dtype=torch.long)}
