"""GGUF vocabularies <-> Tokenizer (lmforge/loaders/gguf/vocab.py): our byte-level BPE tokenizer round trip,
EOS ids and BOS policy, a SentencePiece (`llama`) vocabulary, and the pre-tokenizer names."""

from __future__ import annotations

import gguf
import pytest

from lmforge.loaders.gguf import read_gguf, read_gguf_header, write_gguf
from lmforge.tokenizer import Tokenizer
from tests.loaders.gguf.helpers import (llama_hp, load, random_model, tiny_cfg, tokenizer_kv, transformers_model,
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
    assert tok.decode(tok.encode("x 12345 héllo", add_bos=False)) == "x 12345 héllo"
    # no tokenizer.ggml.add_bos_token: llama.cpp adds a BOS for Llama 3's pre-tokenizer only
    assert tok.add_bos == (pre == "llama-bpe")


# ---- SentencePiece vocabularies as llama.cpp's converter writes them, checked against sentencepiece itself ----
SPM_TEXTS = ["Hello world", " leading space", "   three leading spaces", "several   spaces  inside  ",
             "line one\nline two\n\n", "tabs\tand\t\tmore", "\r\n windows", "café naïve", "Straße 中文",
             "emoji 😀👍🏽", "rare ǅ ☃ 𝄞", "digits 1234567", "quotes ' \" `", "", " ", "\n"]


def _train_spm(add_dummy_prefix: bool) -> bytes:
    """A tiny SentencePiece BPE model trained as Llama 2's was: identity normalization, whitespace kept as
    it is, byte fallback (emoji and rare characters can only be spelled with <0xXX> pieces)."""
    import io

    spm = pytest.importorskip("sentencepiece")
    from conftest import make_corpus

    text = make_corpus(400) + "café naïve déjà vu — Straße groß 中文 你好\n" * 10
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=proto, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        add_dummy_prefix=add_dummy_prefix, num_threads=1, minloglevel=2)
    return proto.getvalue()


def _spm_gguf(path, proto: bytes, *, add_space_prefix: bool | None, add_bos: bool | None = None,
              added: tuple[tuple[str, int], ...] = (), hf_sd: dict | None = None) -> Tokenizer:
    """Write the SentencePiece vocabulary to a GGUF as convert_hf_to_gguf.py does (pieces, scores, token types
    from the model's own flags; `added`: (text, token type) appended after it; `hf_sd`: a model's tensors,
    else none) and read its tokenizer back."""
    import sentencepiece

    from lmforge.loaders.gguf.reader import parse_file
    from lmforge.loaders.gguf.vocab import tokenizer_from_metadata

    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
                     else 6 if sp.is_byte(i) else 1)
    for text, kind in added:
        tokens.append(text)
        scores.append(-1000.0)
        types.append(kind)
    U32, BOOL = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.BOOL
    kv = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.bos_token_id": (sp.bos_id(), U32), "tokenizer.ggml.eos_token_id": (sp.eos_id(), U32),
          "tokenizer.ggml.unknown_token_id": (sp.unk_id(), U32)}
    if add_space_prefix is not None:
        kv["tokenizer.ggml.add_space_prefix"] = (add_space_prefix, BOOL)
    if add_bos is not None:
        kv["tokenizer.ggml.add_bos_token"] = (add_bos, BOOL)
    write_llamacpp_style(path, "llama", llama_hp(), hf_sd or {}, kv)
    return tokenizer_from_metadata(str(path), parse_file(path).metadata)


@pytest.mark.parametrize("prefix", [True, False, None], ids=["space-prefix", "no-space-prefix", "key-missing"])
def test_sentencepiece_ids_and_text_equal_sentencepiece(tmp_path, prefix):
    """Ids, decoded text and streamed bytes of a converter-style `llama` GGUF equal sentencepiece's own, with
    and without the "▁" SentencePiece puts in front of a text (tokenizer.ggml.add_space_prefix; missing
    means on, as in llama.cpp)."""
    import sentencepiece

    proto = _train_spm(add_dummy_prefix=prefix is not False)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    tok = _spm_gguf(tmp_path / "spm.gguf", proto, add_space_prefix=prefix)
    lead = " " if prefix is not False else ""
    pieces = [sp.id_to_piece(i) for i in sp.encode("the model reads")]
    assert any(sp.is_byte(i) for i in sp.encode("😀")) and "▁model" in pieces  # the texts test something
    for text in SPM_TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids) == text, text
        streamed = b"".join(tok.token_bytes(i) for i in ids)
        assert streamed == ((lead + text).encode() if text else b""), text  # generated text keeps its spaces
        assert tok.encode(text) == [sp.bos_id()] + ids  # BOS by default, as llama.cpp does for `llama` files
        assert tok.decode([sp.bos_id()] + ids, skip_special_tokens=True) == text


def test_sentencepiece_special_and_added_tokens(tmp_path):
    """Control tokens are matched in text only when special tokens are allowed, user-defined ones always;
    text after either gets the "▁" prefix again (llama.cpp: a space after every special fragment);
    add_bos_token=false is honoured; the unknown token is special."""
    proto = _train_spm(add_dummy_prefix=True)
    tok = _spm_gguf(tmp_path / "spm.gguf", proto, add_space_prefix=True, add_bos=False,
                    added=(("<|im_end|>", 3), ("[TOOL]", 4)))
    piece = tok.backend.id_to_token
    im_end, tool = tok.backend.token_to_id("<|im_end|>"), tok.backend.token_to_id("[TOOL]")
    assert not tok.add_bos and tok.encode("the")[0] != tok.bos_id
    ids = tok.encode("<s>the<|im_end|>[TOOL]x")
    assert ids[:2] == [tok.bos_id, tok.backend.token_to_id("▁the")] and im_end in ids and tool in ids
    assert ids[ids.index(tool) + 1:] == tok.encode("x") and piece(ids[ids.index(tool) + 1]).startswith("▁")
    literal = tok.encode("<s>the<|im_end|>[TOOL]x", allow_special=False)
    assert tok.bos_id not in literal and im_end not in literal and tool in literal
    assert b"".join(tok.token_bytes(i) for i in literal) == b" <s>the<|im_end|>[TOOL] x"
    assert tok.decode(ids) == "<s> the<|im_end|>[TOOL] x"
    # skipped BOS: the text's own leading "▁" goes, as in transformers (llama.cpp's llama_detokenize keeps it)
    assert tok.decode(ids, skip_special_tokens=True) == "the[TOOL] x"
    assert tok.decode(literal) == "<s>the<|im_end|>[TOOL] x"
    assert tok.backend.token_to_id("<unk>") in [i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special]


def test_generate_streams_sentencepiece_text(tmp_path, capsys):
    """`lmforge generate` on a `llama`-vocabulary GGUF prints what llama.cpp prints for the same tokens: each
    piece with "▁" as a space and <0xXX> pieces as bytes (issue 14 saw `i▁Three▁Sw▁appear` printed). The
    expected text is built from sentencepiece's own piece table; the tokens are the model's greedy choice,
    recomputed here without the engine."""
    import sentencepiece
    import torch

    from lmforge.cli import main

    proto = _train_spm(add_dummy_prefix=True)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    hf = transformers_model("llama", sp.vocab_size(), tied=True)
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(8.0)  # sharp logits: no near-ties for greedy decoding to flip on
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    path = tmp_path / "spm.gguf"
    tok = _spm_gguf(path, proto, add_space_prefix=True, hf_sd=sd)
    prompt, n_new = "the model reads", 24

    model = load(read_gguf(path))
    ids = tok.encode(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    new = ids[len(tok.encode(prompt)):]
    want = b"".join(bytes([int(sp.id_to_piece(i)[3:5], 16)]) if sp.is_byte(i) else
                    sp.id_to_piece(i).replace("▁", " ").encode() for i in new).decode("utf-8", "replace")
    assert any(sp.id_to_piece(i).startswith("▁") for i in new)  # the stream has spaces to get right

    assert main(["generate", str(path), "--prompt", prompt, "--max-new-tokens", str(n_new), "--temperature", "0",
                 "--no-fast"]) == 0
    out = capsys.readouterr().out
    assert out == want + "\n" and "▁" not in out
