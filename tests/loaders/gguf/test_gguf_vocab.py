"""GGUF vocabularies <-> Tokenizer (lmforge/loaders/gguf/vocab.py): our byte-level BPE tokenizer round trip,
EOS ids and BOS policy, a SentencePiece (`llama`) vocabulary, and the pre-tokenizer names."""

from __future__ import annotations

import gguf
import pytest

from lmforge.loaders.gguf import read_gguf, read_gguf_header, write_gguf
from lmforge.tokenizer import Tokenizer
from tests.loaders.gguf.helpers import (llama_hp, random_model, tiny_cfg, tokenizer_kv, transformers_model,
                                        write_llamacpp_style)


def test_tokenizer_round_trip(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    cfg = tiny_cfg(tok)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_model(cfg).state_dict(), tok, qtype="q8_0")
    back = read_gguf(path).tokenizer
    texts = ["the model reads the next word.", "  leading spaces\r\n\ttabs", "héllo wörld — 日本語 🎉👍🏽",
             "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "x = 1234567 + 89;  'll 've", "", "\x00\x01 nul"]
    for text in texts:
        assert back.encode(text) == tok.encode(text), text
        assert back.encode(text, allow_special=False) == tok.encode(text, allow_special=False), text
        assert back.decode(back.encode(text)) == text
    assert (back.bos_id, back.eos_id, back.eot_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id)
    assert back.eos_ids == tok.eos_ids and back.add_bos == tok.add_bos
    assert back.chat_template == tok.chat_template
    chat = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    assert back.encode_chat(chat, add_generation_prompt=True) == tok.encode_chat(chat, add_generation_prompt=True)
    assert [back.token_bytes(i) for i in range(tok.vocab_size)] == [tok.token_bytes(i) for i in range(tok.vocab_size)]
    assert back.decode([0, 1, 2, 3], skip_special_tokens=True) == ""
    md = read_gguf_header(path)[0]
    assert md["tokenizer.ggml.pre"] == "llama-bpe" and md["tokenizer.ggml.model"] == "gpt2"
    assert "tokenizer.ggml.tokens" not in md and "tokenizer.ggml.merges" not in md


def test_eos_token_ids_and_add_bos(tmp_path, tiny_tokenizer):
    tok = Tokenizer(tiny_tokenizer.backend, chat_template=None, eot_token=None, add_bos=True)
    cfg = tiny_cfg(tok, vocab_size=tok.vocab_size + 8)  # spare embedding rows: padded token list
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_model(cfg).state_dict(), tok, qtype="f32", eos_token_ids=[0, 2])
    md, _ = read_gguf_header(path)
    assert md["tokenizer.ggml.eos_token_id"] == 0 and md["tokenizer.ggml.eot_token_id"] == 2
    assert "tokenizer.chat_template" not in md and md["tokenizer.ggml.add_bos_token"] is True
    back = read_gguf(path).tokenizer
    assert back.add_bos and back.encode("hi")[0] == back.bos_id
    assert back.eos_ids == [0, 2] and back.chat_template is None
    assert back.vocab_size == cfg.vocab_size and back.backend.id_to_token(tok.vocab_size) == f"[PAD{tok.vocab_size}]"


def test_sentencepiece_vocabulary(tmp_path, tiny_tokenizer):
    """A `llama` (SentencePiece BPE) vocabulary: merges from scores, "▁" for spaces, byte fallback."""
    from tokenizers import SentencePieceBPETokenizer

    from conftest import make_corpus

    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator([make_corpus()], vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    pieces = [spm.id_to_token(i) for i in range(spm.get_vocab_size())]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = pieces[:3] + byte_tokens + pieces[3:]  # Llama 2's order: specials, bytes, pieces
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 3)
    kv = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces) - 3)],
          "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": (1, gguf.GGUFValueType.UINT32),
          "tokenizer.ggml.eos_token_id": (2, gguf.GGUFValueType.UINT32),
          "tokenizer.ggml.unknown_token_id": (0, gguf.GGUFValueType.UINT32)}
    hf = transformers_model("llama", len(tokens), tied=True)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    path = tmp_path / "spm.gguf"
    write_llamacpp_style(path, "llama", llama_hp(), sd, kv)
    tok = read_gguf(path).tokenizer
    assert (tok.bos_token, tok.eos_token, tok.add_bos) == ("<s>", "</s>", True)
    for text in ["the model reads the next word.", "each layer predicts some text.\nthe cache learns"]:
        ids = tok.encode(text, add_bos=False)
        assert [tok.backend.id_to_token(i) for i in ids] == spm.encode(text).tokens, text
        assert tok.decode(ids) == text
    ids = tok.encode("é!", add_bos=False)
    assert [tok.backend.id_to_token(i) for i in ids] == ["▁", "<0xC3>", "<0xA9>", "<0x21>"]  # not in the corpus
    assert tok.decode(ids) == "é!"
    assert tok.encode("<s>the")[:2] == [1, 1]
    # Streaming (token_bytes, what the engine's detokenizer joins) reads "▁" as a space and <0xC3><0xA9> as
    # "é": issue 14 saw `i▁Three▁Sw▁appear` printed for such files. Generated tokens keep the space in front.
    from lmforge.engine.detokenize import IncrementalDetokenizer

    for text in ["the model reads the next word.", "é! each layer\n  predicts"]:
        ids = tok.encode(text, add_bos=False)
        assert b"".join(tok.token_bytes(i) for i in ids).decode() == " " + text
        detok = IncrementalDetokenizer(tok)
        assert "".join(detok.add(i) for i in ids) + detok.flush() == " " + text
    assert tok.token_bytes(tok.backend.token_to_id("<0xC3>")) == b"\xc3"
    assert tok.token_text(tok.backend.token_to_id("▁the")) == " the"


PRE_SPLITS = {  # tokenizer.ggml.pre -> how "x 12345 héllo" is split before BPE
    "llama-bpe": ["x", "Ġ", "123", "45", "ĠhÃ©llo"],
    "qwen2": ["x", "Ġ", "1", "2", "3", "4", "5", "ĠhÃ©llo"],  # after NFC
    "gpt-2": ["x", "Ġ12345", "ĠhÃ©llo"],
    "smollm": ["x", "Ġ", "1", "2", "3", "4", "5", "ĠhÃ©llo"],
    None: ["x", "Ġ12345", "ĠhÃ©llo"],  # missing: GPT-2's, as llama.cpp does, with a warning
}


@pytest.mark.parametrize("pre", PRE_SPLITS)
def test_pre_tokenizer_names(tmp_path, tiny_tokenizer, pre):
    hf = transformers_model("llama", tiny_tokenizer.vocab_size, tied=False)
    kv = {**tokenizer_kv(tiny_tokenizer), "tokenizer.ggml.pre": pre}
    path = tmp_path / "pre.gguf"
    write_llamacpp_style(path, "llama", llama_hp(), hf.state_dict(), kv,
                         skip_keys={"tokenizer.ggml.pre"} if pre is None else ())
    if pre is None:
        with pytest.warns(UserWarning, match="no tokenizer.ggml.pre"):
            tok = read_gguf(path).tokenizer
    else:
        tok = read_gguf(path).tokenizer
    pieces = tok.backend.pre_tokenizer.pre_tokenize_str(tok.backend.normalizer.normalize_str("x 12345 he\u0301llo")
                                                        if tok.backend.normalizer else "x 12345 héllo")
    assert [p for p, _ in pieces] == PRE_SPLITS[pre]
    assert tok.decode(tok.encode("x 12345 héllo")) == "x 12345 héllo"
