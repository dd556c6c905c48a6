"""Tests for lmforge.tokenizer.bpe: exact round trip, fixed special ids, save/load, transformers parity, chat."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from lmforge.errors import UserError
from lmforge.tokenizer import DEFAULT_CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, train_tokenizer
from lmforge.tokenizer.bpe import _BYTE_TO_CHAR  # the byte table itself is under test

WORDS = (
    "the quick brown fox jumps over lazy dog model token train data loss step learning rate "
    "attention layer head embedding vector matrix python def return import class self value "
    "日本語 テキスト 中文 文本 한국어 émigré naïve façade Ελληνικά русский 😀 🚀 👍🏽 ∑ ∫ → ≤"
).split()
EXPLICIT = [
    "",
    " ",
    "hello world",
    "  leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\r\nand\rCR",
    "emoji 😀🚀👨‍👩‍👧‍👦 and flags 🇯🇵",
    "CJK 日本語のテキスト 中文文本 한국어",
    "control \x00\x01\x1b[31m\x7f chars",
    "literal <|im_end|> and <|endoftext|><|im_start|>user\n<|pad|>",
    "partial <|im_end and |> and <| and <||>",
    "numbers 1234567890 3.14159 -42 1e-9",
    "ĠĊ stand-in characters themselves",
    "\ufeffBOM and zero\u200bwidth",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there! 😀 What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "  leading space and <b>html</b> & \"quotes\""},
]


def _corpus() -> list[str]:
    rng = random.Random(0)
    docs = []
    for _ in range(60):
        docs.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + rng.choice([".\n", "!\n", "\r\n"]))
    docs.append("def f(x):\n    return x + 1\n\n" * 5)
    return docs


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return train_tokenizer(_corpus(), 400, show_progress=False)


@pytest.fixture(scope="session")
def saved_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


@pytest.fixture(scope="session")
def hf_tok(saved_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(saved_dir))


# ------------------------------------------------------------------------------------------------ basics


def test_trained_shape(tok):
    assert 260 < tok.vocab_size <= 400
    assert tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tok.backend.normalizer is None  # any normalizer would break the exact round trip


def test_special_ids_fixed(tok):
    assert SPECIAL_TOKENS == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    assert [tok.backend.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 3)
    assert tok.eos_ids == [0, 2]
    # Stable across vocab sizes, including the minimum (no merges at all).
    small = train_tokenizer(["tiny corpus tiny corpus"], 260, show_progress=False)
    assert small.vocab_size == 260
    assert [small.backend.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert small.decode(small.encode("any text 😀")) == "any text 😀"


def test_byte_alphabet_covered(tok):
    assert set(_BYTE_TO_CHAR.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = tok.backend.get_vocab()
    assert all(ch in vocab for ch in _BYTE_TO_CHAR.values())


def test_vocab_too_small_raises():
    with pytest.raises(UserError) as e:
        train_tokenizer(["some text"], 259, show_progress=False)
    msg = str(e.value)
    assert "259" in msg and "256" in msg and str(len(SPECIAL_TOKENS)) in msg and "260" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("texts", [[], ["", ""], iter(())])
def test_empty_texts_raise(texts):
    with pytest.raises(UserError, match="empty"):
        train_tokenizer(texts, 300, show_progress=False)


def test_bad_texts_raise():
    with pytest.raises(UserError):
        train_tokenizer("a single string", 300, show_progress=False)
    with pytest.raises(UserError, match="strings"):
        train_tokenizer(["ok", 3], 300, show_progress=False)


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("s", EXPLICIT)
def test_round_trip_explicit(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.decode(tok.encode(s, allow_special=False)) == s
    assert b"".join(tok.token_bytes(i) for i in ids) == s.encode("utf-8")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_round_trip_property(tok, s):
    assert tok.decode(tok.encode(s), skip_special_tokens=False) == s
    assert tok.decode(tok.encode(s, allow_special=False)) == s


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(SPECIAL_TOKENS + ["a", " ", "😀", "\n", "<|", "|>"]), max_size=12).map("".join))
def test_round_trip_with_specials(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_specials_in_raw_text(tok):
    s = "a<|im_end|>b"
    assert 2 in tok.encode(s)  # recognized as the control token, like transformers
    literal = tok.encode(s, allow_special=False)
    assert not set(literal) & {0, 1, 2, 3}  # encoded as plain bytes
    assert tok.decode(literal) == s
    assert tok.decode(tok.encode(s), skip_special_tokens=True) == "ab"


def test_encode_batch_and_bos(tok):
    texts = ["hello world", "日本語 😀", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode("hello", add_bos=True) == [tok.bos_id] + tok.encode("hello")
    assert tok.encode("hello")[:1] != [tok.bos_id]


def test_token_bytes_multibyte(tok):
    s = "naïve 日本語 😀👍🏽 \r\n x"
    ids = tok.encode(s)
    assert b"".join(tok.token_bytes(i) for i in ids) == s.encode("utf-8")
    assert [tok.token_bytes(i) for i in range(4)] == [t.encode() for t in SPECIAL_TOKENS]
    # A lone byte of a multi-byte character is a token of its own: bytes, not text.
    assert tok.token_bytes(tok.backend.token_to_id(_BYTE_TO_CHAR[0xF0])) == b"\xf0"
    with pytest.raises(IndexError):
        tok.token_bytes(tok.vocab_size)


# ------------------------------------------------------------------------------------------ save / load


def test_save_load_round_trip(tok, saved_dir):
    names = {p.name for p in saved_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"} <= names
    assert not any(n.endswith(".tmp") for n in names)
    cfg = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["add_bos_token"] is False and cfg["add_eos_token"] is False
    assert cfg["clean_up_tokenization_spaces"] is False
    assert cfg["added_tokens_decoder"]["2"]["content"] == "<|im_end|>"
    assert cfg["added_tokens_decoder"]["2"]["special"] is True

    loaded = Tokenizer.load(saved_dir)
    for s in EXPLICIT:
        assert loaded.encode(s) == tok.encode(s)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.chat_template == tok.chat_template
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.eos_ids) == (0, 0, 3, [0, 2])


def test_load_variants(tok, tmp_path):
    tok.save(tmp_path)
    # chat_template.jinja wins over the config key; tokens may be AddedToken dicts.
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"content": "<|im_end|>", "special": True, "__type": "AddedToken"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.load(tmp_path)
    assert t.chat_template == "{{ messages[0]['content'] }}"
    assert t.eos_id == 2 and t.eos_ids == [2]
    assert t.fingerprint() != tok.fingerprint()


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope")


def test_fingerprint(tok):
    fp = tok.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert Tokenizer(tok.backend, chat_template=tok.chat_template).fingerprint() == fp
    assert Tokenizer(tok.backend, chat_template=None).fingerprint() != fp


# ------------------------------------------------------------------------------------------ transformers


def test_transformers_same_ids(tok, hf_tok):
    for s in EXPLICIT:
        assert hf_tok(s)["input_ids"] == tok.encode(s), s
        assert hf_tok.decode(tok.encode(s)) == s
    assert hf_tok.bos_token == "<|endoftext|>" and hf_tok.eos_token == "<|endoftext|>"
    assert hf_tok.pad_token_id == 3


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_transformers_chat_template_parity(tok, hf_tok, add_generation_prompt):
    theirs = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    their_ids = hf_tok.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert list(their_ids) == tok.encode(ours) == tok.encode_chat(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert their_ids[0] == tok.backend.token_to_id("<|im_start|>")  # no BOS, let alone two


def test_add_bos_tokenizer(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    bos_tok = Tokenizer(tok.backend, chat_template=tok.chat_template, add_bos=True)
    assert tok.backend.post_processor is None  # the caller's backend is not mutated
    assert bos_tok.encode("hi there") == [0] + tok.encode("hi there")
    assert bos_tok.encode("hi there", add_bos=False) == tok.encode("hi there")
    assert bos_tok.encode_batch(["hi there"]) == [tok.encode("hi there")]
    bos_tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert hf("hi there")["input_ids"] == bos_tok.encode("hi there")
    chat_ids = hf.apply_chat_template(MESSAGES, tokenize=True, return_dict=False)
    assert list(chat_ids) == bos_tok.encode_chat(MESSAGES)
    assert chat_ids[0] != bos_tok.bos_id
    loaded = Tokenizer.load(tmp_path)
    assert loaded.add_bos and loaded.encode("hi there") == bos_tok.encode("hi there")
    assert loaded.fingerprint() == bos_tok.fingerprint()


def test_add_bos_is_read_from_tokenizer_json(tok, tmp_path):
    """As in transformers 5, tokenizer.json's post-processor decides whether plain text gets a BOS."""
    bos_tok = Tokenizer(tok.backend, chat_template=tok.chat_template, add_bos=True)
    assert Tokenizer(bos_tok.backend, add_bos=True).backend is bos_tok.backend  # already prepends it: kept
    bos_tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for flag in (None, False):
        if flag is None:
            cfg.pop("add_bos_token")
        else:
            cfg["add_bos_token"] = flag
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
        loaded = Tokenizer.load(tmp_path)
        assert loaded.add_bos and loaded.encode("hi there") == [0] + tok.encode("hi there")
        assert loaded.encode_chat(MESSAGES)[0] != 0


def test_with_extra_eos_ids(tok, tmp_path):
    t = tok.with_extra_eos_ids([2, 3, 100])
    assert t.eos_ids == [0, 2, 3, 100] and tok.eos_ids == [0, 2]  # a copy; known ids are not repeated
    assert t.extra_eos_tokens == ["<|pad|>", tok.backend.id_to_token(100)]
    t.save(tmp_path)
    assert Tokenizer.load(tmp_path).eos_ids == [0, 2, 3, 100]
    with pytest.raises(UserError, match="not in the tokenizer's vocabulary"):
        tok.with_extra_eos_ids([10**6])
    with pytest.raises(UserError, match="integer"):
        tok.with_extra_eos_ids(["2"])


def test_constructor_validates_tokens(tok):
    with pytest.raises(UserError, match="not in the tokenizer's vocabulary"):
        Tokenizer(tok.backend, bos_token="<s>")
    t = Tokenizer(tok.backend, bos_token=None, eos_token=None, eot_token=None, pad_token=None)
    assert (t.bos_id, t.eos_id, t.pad_id, t.eos_ids) == (None, None, None, [])
    with pytest.raises(UserError, match="no bos"):
        t.encode("x", add_bos=True)


def test_long_texts_encode_to_the_same_ids(tiny_tokenizer):
    """Texts past _LONG_TEXT characters go through encode_batch (which lets other threads run): same ids."""
    from lmforge.tokenizer.bpe import _LONG_TEXT

    text = ("the model reads the next word.\n  ünïcode 🙂 " * (_LONG_TEXT // 20))[: 2 * _LONG_TEXT + 7]
    assert len(text) > _LONG_TEXT
    assert tiny_tokenizer.encode(text) == tiny_tokenizer.backend.encode(text, add_special_tokens=False).ids
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text
