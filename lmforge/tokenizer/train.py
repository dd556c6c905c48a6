"""Training a byte-level BPE tokenizer with Hugging Face `tokenizers` (the Rust trainer, not a Python merge
loop): the untrained pipeline (Llama-3 split regex -> ByteLevel, no normalizer; see `bpe`'s notes on why),
the vocabulary-size check, and `train_tokenizer`, which returns a `Tokenizer` with the special tokens at
ids 0..3 and the ChatML template.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from lmforge.errors import UserError
from lmforge.tokenizer.bpe import DEFAULT_CHAT_TEMPLATE, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

__all__ = ["check_vocab_size", "train_tokenizer"]


def _new_backend() -> tokenizers.Tokenizer:
    """An untrained byte-level BPE pipeline: Llama-3 split regex -> ByteLevel, no normalizer."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    return tk


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a vocabulary that cannot hold every byte plus the special tokens (callers check early, before
    reading a corpus)."""
    minimum = 256 + len(SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise UserError(f"vocab size must be an integer, got {vocab_size!r}")
    if vocab_size < minimum:
        raise UserError(
            f"vocab size {vocab_size} is below the byte alphabet (256) + {len(SPECIAL_TOKENS)} special tokens "
            f"= {minimum}"
        )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts` (streamed; any iterable of strings).

    `vocab_size` counts everything: 4 special tokens (ids 0..3) + 256 byte tokens + merges. The trainer may
    stop below it when the corpus has no more pairs seen `min_frequency` times. The result carries the
    ChatML `DEFAULT_CHAT_TEMPLATE`.
    """
    check_vocab_size(vocab_size)
    if isinstance(texts, (str, bytes)):
        raise UserError("train_tokenizer wants an iterable of texts (e.g. a list of strings), not a single string")

    def checked(items: Iterable[Any]) -> Iterable[str]:
        for t in items:
            if not isinstance(t, str):
                raise UserError(f"training texts must be strings, got {type(t).__name__}")
            if t:
                yield t

    stream = iter(checked(texts))
    first = next(stream, None)
    if first is None:
        raise UserError("no training text: the texts given to train the tokenizer were empty")

    tk = _new_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(chain([first], stream), trainer=trainer)
    for i, tok in enumerate(SPECIAL_TOKENS):  # the fixed-id promise that checkpoints rely on
        assert tk.token_to_id(tok) == i, f"special token {tok} got id {tk.token_to_id(tok)}, expected {i}"
    return Tokenizer(tk, chat_template=DEFAULT_CHAT_TEMPLATE)
