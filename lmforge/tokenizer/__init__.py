"""Tokenizers: byte-level BPE, the `Tokenizer` class and the Hugging Face layout (:mod:`.bpe`), training one
(:mod:`.train`), and chat templates rendered in a sandbox as transformers renders them (:mod:`.chat_template`)."""

from lmforge.tokenizer import bpe, chat_template, train
from lmforge.tokenizer.bpe import (
    DEFAULT_CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    load_hf_tokenizer,
)
from lmforge.tokenizer.chat_template import (
    TemplateLimitError,
    TemplateLimits,
    check_chat_template,
    compile_chat_template,
    render_chat_template,
)
from lmforge.tokenizer.train import check_vocab_size, train_tokenizer

__all__ = [*bpe.__all__, *train.__all__, *chat_template.__all__]
