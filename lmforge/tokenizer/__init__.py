"""Tokenizers: byte-level BPE, the `Tokenizer` class and the Hugging Face layout (:mod:`.bpe`), and chat
templates rendered in a sandbox as transformers renders them (:mod:`.chat_template`)."""

from lmforge.tokenizer import bpe, chat_template
from lmforge.tokenizer.bpe import (
    DEFAULT_CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    check_vocab_size,
    load_hf_tokenizer,
    train_tokenizer,
)
from lmforge.tokenizer.chat_template import compile_chat_template, render_chat_template

__all__ = [*bpe.__all__, *chat_template.__all__]
