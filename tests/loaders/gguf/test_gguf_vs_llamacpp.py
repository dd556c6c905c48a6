"""GGUF tokenizers against llama.cpp's own (issue 14, requirement 8): the same token ids and the same text.

The GGUF files are made by **llama.cpp's converter** (`convert_hf_to_gguf.py`, from the llama.cpp tree in the
llama-cpp-python sdist) out of tiny Hugging Face model directories built here, with vocabularies trained here
on tinyshakespeare (no hub):

* ``spm``: a SentencePiece BPE model trained the way Llama 2's was (identity normalization, no whitespace
  collapsing, byte fallback, digits split), plus two special tokens and one plain added token in
  tokenizer_config.json -> ``tokenizer.ggml.model = llama`` with scores, BYTE / CONTROL / USER_DEFINED types.
* ``spm-noprefix``: the same with ``add_prefix_space: false`` -> ``tokenizer.ggml.add_space_prefix = false``.
* ``llama-bpe``: lmforge's own byte-level BPE (its split regex is Llama 3's) -> ``gpt2`` + ``llama-bpe``.
* ``gpt-2``, ``qwen2``, ``smollm``: BPEs trained with the normalizer and pre-tokenizer of the published
  GPT-2, Qwen2 and SmolLM tokenizer.json files -> ``gpt2`` + that pre-tokenizer name.

The converter names a BPE pre-tokenizer by hashing the ids of a probe text, which only matches the real
published vocabularies; for ours it refuses ("BPE pre-tokenizer was not recognized"). So it is run with
that one function answering the name of the pre-tokenizer the vocabulary was really built with; everything
else (tokens, types, merges, special ids, BOS flags) is the converter's own output.

What "the same" means, per text and vocabulary:

* ids: `Tokenizer.encode(text, add_bos=None|False, allow_special=True|False)` ==
  `Llama.tokenize(text, add_bos=True|False, special=True|False)` (llama.cpp's add_bos means "add the
  vocabulary's specials", which is lmforge's add_bos=None);
* streamed text: lmforge's `token_bytes` joined (what `lmforge generate` prints) == llama.cpp's
  `llama_token_to_piece` joined (what llama.cpp prints while generating), byte for byte;
* decoded text: `Tokenizer.decode(ids)` == llama.cpp's `llama_detokenize(ids, remove_special=False,
  unparse_special=True)` for SentencePiece vocabularies (one leading space dropped, as both do).
  For byte-level BPE vocabularies llama.cpp's llama_detokenize also runs transformers' lossy
  `clean_up_tokenization_spaces` pass (" ," -> ","), which lmforge leaves out on purpose (decode(encode(s))
  == s); there the reference is llama.cpp's pieces joined, its text before that pass.
* `decode(ids, skip_special_tokens=True)` == `llama_detokenize(ids, unparse_special=False)` (pieces joined for
  byte-level BPE) on the ids of the text without BOS, but with special tokens parsed. One difference is
  kept on purpose and checked to be exactly that: when a SentencePiece text starts with a special token
  ("<|im_start|>user"), llama.cpp skips it and keeps the space the encoder put after it (" user"), since it
  only drops a leading space from the first token; lmforge drops it ("user"), as transformers does with
  the same decoder (so lmforge's decode of a model directory and of its GGUF agree).

Also: every token's bytes against llama.cpp's piece for it, the BOS policy of files without
tokenizer.ggml.add_bos_token, and the one id difference kept on purpose (Qwen2's NFC normalization).

The tests need `llama_cpp` (llama-cpp-python) and the llama.cpp source tree, and skips without them;
the SentencePiece decoding itself is also covered without llama.cpp by test_gguf_vocab.py.
`bench/tokenizer_vs_llamacpp.py` prints the same comparison as a table.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
_LLAMA_CPP_SRC_DEFAULT = "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp"

# Text the vocabularies are trained on besides Shakespeare: some non-ASCII characters become pieces of
# their own (é, ß, 中), the others (emoji, rare scripts) can only be spelled with byte-fallback pieces.
EXTRA_TRAINING = "café naïve déjà vu — Straße groß 中文 你好 世界 ünïcödé\n" * 20

TRICKY = [
    "Hello world", " leading space", "   three leading spaces", "several   spaces  inside  ", "trailing ",
    "line one\nline two\n\nline four\n", "\n starts with a newline", "tabs\tand\t\tmore\t tabs", "\r\n windows",
    "café naïve déjà vu", "Straße groß", "中文 你好 世界", "emoji 😀👍🏽 and 🦙", "rare ǅ Ω ŧ ☃ 𝄞 ꙮ",
    "<s> BOS in text </s>", "no-space<s>between</s>tokens", "<|im_start|>user\nhi<|im_end|>\n",
    "[TOOL] call [TOOL]x", "<unk> here", "digits 1234567 3.14", "quotes ' \" ` and 's 're", "Hello , world ? it 's",
    "▁ a literal marker", "nul \x00 and del \x7f", "", " ", "\t", "\n\n",
]
ADDED_SPECIAL = ["<|im_start|>", "<|im_end|>"]
ADDED_PLAIN = "[TOOL]"  # an added token that is not special: USER_DEFINED in the GGUF
N_PAD = 2  # embedding rows past the tokenizer: the converter fills them with "[PADn]" tokens of type UNUSED


def llama_cpp_src() -> Path | None:
    """The llama.cpp source tree with convert_hf_to_gguf.py (LMFORGE_LLAMA_CPP_SRC, or this project's copy)."""
    d = Path(os.environ.get("LMFORGE_LLAMA_CPP_SRC", _LLAMA_CPP_SRC_DEFAULT))
    return d if (d / "convert_hf_to_gguf.py").is_file() else None


def training_text(n_chars: int = 200_000) -> str:
    text = DATA.read_text(encoding="utf-8")[:n_chars] if DATA.is_file() else ""
    if not text:  # not in every checkout: the shared data folder is this project's
        from conftest import make_corpus

        text = make_corpus()
    return text + EXTRA_TRAINING


# ---- Hugging Face model directories --------------------------------------------------------------------
def _save_model(d: Path, vocab_size: int, bos: int | None, eos: int | None) -> None:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)


def spm_model_dir(d: Path, *, add_prefix_space: bool = True) -> Path:
    """A Llama-2-like directory: tokenizer.model (SentencePiece BPE with byte fallback), tokenizer_config.json
    with added tokens, and a tiny random LlamaForCausalLM."""
    import io

    import sentencepiece as spm

    d.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text().splitlines()), model_writer=proto, vocab_size=800, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        add_dummy_prefix=add_prefix_space, num_threads=1, minloglevel=2)
    (d / "tokenizer.model").write_bytes(proto.getvalue())
    n = spm.SentencePieceProcessor(model_proto=proto.getvalue()).vocab_size()
    added = {str(n + i): {"content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                          "single_word": False} for i, t in enumerate(ADDED_SPECIAL)}
    added[str(n + len(ADDED_SPECIAL))] = {"content": ADDED_PLAIN, "special": False, "normalized": False,
                                          "lstrip": False, "rstrip": False, "single_word": False}
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added, "legacy": True}
    if not add_prefix_space:
        config["add_prefix_space"] = False
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    _save_model(d, n + len(added) + N_PAD, bos=1, eos=2)
    return d


def _gpt2():
    from tokenizers import pre_tokenizers

    return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _qwen2():
    from tokenizers import Regex, normalizers, pre_tokenizers

    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    return normalizers.NFC(), pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _smollm():
    from tokenizers import pre_tokenizers

    return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


# (normalizer, pre-tokenizer) of the published tokenizer.json files of GPT-2, Qwen2 and SmolLM
_PUBLISHED_PIPELINES = {"gpt-2": _gpt2, "qwen2": _qwen2, "smollm": _smollm}


def bpe_model_dir(d: Path, pre: str) -> Path:
    """A byte-level BPE directory: lmforge's own tokenizer (Llama 3's split) for "llama-bpe"; for "gpt-2",
    "qwen2" and "smollm" a BPE trained with the published tokenizer's normalizer and pre-tokenizer."""
    d.mkdir(parents=True, exist_ok=True)
    if pre == "llama-bpe":
        from lmforge.tokenizer import Tokenizer, train_tokenizer

        tok = train_tokenizer([training_text()], 1000, show_progress=False)
        tok = Tokenizer(tok.backend, chat_template=tok.chat_template, add_bos=True)  # llama.cpp's llama-bpe default
        tok.save(d)
        _save_model(d, tok.vocab_size + N_PAD, bos=tok.bos_id, eos=tok.eos_id)
    elif pre in _PUBLISHED_PIPELINES:
        import tokenizers
        import transformers
        from tokenizers import decoders, models, pre_tokenizers, trainers

        bl = tokenizers.Tokenizer(models.BPE())
        bl.normalizer, bl.pre_tokenizer = _PUBLISHED_PIPELINES[pre]()
        bl.decoder = decoders.ByteLevel()
        bl.train_from_iterator([training_text()], trainers.BpeTrainer(
            vocab_size=1000, min_frequency=2, show_progress=False, special_tokens=["<|endoftext|>", *ADDED_SPECIAL],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        bl.add_tokens([ADDED_PLAIN])
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bl, bos_token="<|endoftext|>",
                                                    eos_token="<|endoftext|>", clean_up_tokenization_spaces=False)
        fast.save_pretrained(d)
        _save_model(d, len(fast) + N_PAD, bos=0, eos=0)
    else:
        raise ValueError(pre)
    return d


# The converter, with its pre-tokenizer detection answering the name of what the vocabulary really uses
# (it only recognises the published vocabularies by a hash of their ids).
_RUN_CONVERTER = r"""
import runpy, sys
src, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [src, src + "/gguf-py"]
if pre != "-":
    from conversion.base import TextModel
    TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(model_dir: Path, out: Path, pre: str | None = None) -> Path:
    """`convert_hf_to_gguf.py model_dir --outfile out --outtype f32`, as a subprocess."""
    src = llama_cpp_src()
    if src is None:
        raise FileNotFoundError("llama.cpp's convert_hf_to_gguf.py not found (set LMFORGE_LLAMA_CPP_SRC)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), str(src)])}
    r = subprocess.run([sys.executable, "-c", _RUN_CONVERTER, str(src), pre or "-", str(model_dir), "--outfile",
                        str(out), "--outtype", "f32"], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}")
    return out


VOCABS = ("spm", "spm-noprefix", "llama-bpe", "gpt-2", "qwen2", "smollm")


def build_gguf(kind: str, workdir: Path) -> Path:
    """One of VOCABS as a GGUF made by llama.cpp's converter."""
    d = workdir / kind
    if kind == "spm":
        return convert(spm_model_dir(d), workdir / f"{kind}.gguf")
    if kind == "spm-noprefix":
        return convert(spm_model_dir(d, add_prefix_space=False), workdir / f"{kind}.gguf")
    return convert(bpe_model_dir(d, kind), workdir / f"{kind}.gguf", pre=kind)


# ---- llama.cpp's side -------------------------------------------------------------------------------
def _quiet_callback():
    import llama_cpp

    return llama_cpp.llama_log_callback(lambda level, text, user_data: None)


_QUIET = None


class LlamaCppVocab:
    """llama.cpp's tokenizer of a GGUF (vocab_only): tokenize, pieces, detokenize."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        global _QUIET
        if _QUIET is None:  # kept alive for as long as llama.cpp may call it
            _QUIET = _quiet_callback()
        self._lib = llama_cpp
        llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))  # e.g. "prompt starts with 2 BOS tokens"
        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)

    def tokenize(self, text: str, add_bos: bool, special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def pieces(self, ids: list[int], special: bool = True) -> bytes:
        """Each token's piece joined, no space removed: what llama.cpp prints while it generates."""
        out, buf = b"", ctypes.create_string_buffer(256)
        for i in ids:
            n = self._lib.llama_token_to_piece(self.vocab, i, buf, len(buf), 0, special)
            assert 0 <= n <= len(buf)
            out += buf.raw[:n]
        return out

    def detokenize(self, ids: list[int], special: bool = True) -> bytes:
        """llama_detokenize(remove_special=False, unparse_special=special): llama.cpp's whole-text decode."""
        arr = (self._lib.llama_token * max(len(ids), 1))(*ids)
        size = 64 + 16 * len(ids)
        buf = ctypes.create_string_buffer(size)
        n = self._lib.llama_detokenize(self.vocab, arr, len(ids), buf, size, False, special)
        assert 0 <= n <= size
        return buf.raw[:n]


def compare(tok, ref: LlamaCppVocab, text: str, kind: str) -> dict[str, bool]:
    """Every check of the module docstring for one text and one of VOCABS: {check name: equal}."""
    byte_level = not kind.startswith("spm")
    res = {}
    for add_bos in (True, False):
        for special in (True, False):
            ours = tok.encode(text, add_bos=None if add_bos else False, allow_special=special)
            res[f"ids bos={int(add_bos)} special={int(special)}"] = ours == ref.tokenize(text, add_bos, special)
    ids = ref.tokenize(text, True, True)  # decode llama.cpp's ids, so a text check never rides on an ids one
    res["stream"] = b"".join(tok.token_bytes(i) for i in ids) == ref.pieces(ids)
    want = ref.pieces(ids) if byte_level else ref.detokenize(ids)
    res["decode"] = tok.decode(ids) == want.decode("utf-8", "replace")
    plain = ref.tokenize(text, False, True)
    theirs = (ref.pieces if byte_level else ref.detokenize)(plain, special=False).decode("utf-8", "replace")
    specials = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    if kind == "spm" and plain[:1] and plain[0] in specials and theirs.startswith(" "):
        theirs = theirs[1:]  # the one known difference: see the module docstring
    res["decode skip_special"] = tok.decode(plain, skip_special_tokens=True) == theirs
    return res


# ---- the test -------------------------------------------------------------------------------------------
def _requirements() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama_cpp (llama-cpp-python) is not installed: no llama.cpp tokenizer to compare with"
    if llama_cpp_src() is None:
        return "llama.cpp's convert_hf_to_gguf.py is not here (set LMFORGE_LLAMA_CPP_SRC to a llama.cpp tree)"
    for mod in ("sentencepiece", "transformers"):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed (needed to build the test vocabularies)"
    return None


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    why = _requirements()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("vs_llamacpp")
    return {kind: build_gguf(kind, work) for kind in VOCABS}


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Seeded strings mixing the hard parts: runs of spaces, newlines, tabs, CR, punctuation, accents, CJK,
    emoji with joiners and modifiers, U+2581 itself, and the special / added tokens' texts."""
    import random

    rng = random.Random(seed)
    pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + list("      \n\n\t\r")
            + list(".,;:!?'\"-()[]{}<>|_/\\@#$%^&*+=~`") + list("éèàçßöüñøÆŒ中文你好世界日本語한국어ǅΩŧ☃𝄞ꙮ")
            + ["😀", "👍🏽", "🦙", "👨\u200d👩", "\u00a0", "\u2581", "\u3000", "<s>", "</s>", "<unk>", *ADDED_SPECIAL,
               ADDED_PLAIN, "<|endoftext|>", "'s", "'ll", " the", " and", "ing", "   "])
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.mark.parametrize("kind", VOCABS)
def test_same_ids_and_text_as_llamacpp(ggufs, kind):
    from lmforge.loaders.gguf import read_gguf

    path = ggufs[kind]
    tok = read_gguf(path).tokenizer
    ref = LlamaCppVocab(path)
    failed = []
    for text in TRICKY + random_texts(300):
        for check, ok in compare(tok, ref, text, kind).items():
            if not ok:
                failed.append(f"{check}: {text!r}")
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("kind", VOCABS)
def test_every_token_streams_as_llamacpp_prints_it(ggufs, kind):
    """Each token's bytes (what `lmforge generate` streams) are the piece llama.cpp prints for it: "▁" as a
    space, <0xXX> as one byte, byte-level BPE characters as their bytes, control and added tokens as their
    text. Not the UNUSED "[PADn]" fillers: llama.cpp prints nothing for them, lmforge their placeholder
    text (no model generates them)."""
    from lmforge.loaders.gguf import read_gguf

    path = ggufs[kind]
    tok = read_gguf(path).tokenizer
    ref = LlamaCppVocab(path)
    assert tok.vocab_size == ref.llm.n_vocab()
    unused = {i for i in range(tok.vocab_size) if tok.backend.id_to_token(i).startswith("[PAD")}
    assert len(unused) == N_PAD
    differ = [(i, tok.backend.id_to_token(i), tok.token_bytes(i), ref.pieces([i]))
              for i in range(tok.vocab_size) if i not in unused and tok.token_bytes(i) != ref.pieces([i])]
    assert not differ, differ[:10]


@pytest.mark.parametrize("kind", ["llama-bpe", "gpt-2", "spm"])
def test_bos_policy_without_add_bos_token_key(ggufs, kind, tmp_path):
    """A file without tokenizer.ggml.add_bos_token (older conversions): llama.cpp adds a BOS for SentencePiece
    and Llama 3 vocabularies and none for GPT-2's; so does lmforge. The key is removed with the llama.cpp
    tree's own gguf_new_metadata.py."""
    from lmforge.loaders.gguf import read_gguf, read_gguf_header

    src, path = llama_cpp_src(), tmp_path / f"{kind}-nokey.gguf"
    r = subprocess.run([sys.executable, str(src / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"),
                        "--remove-metadata", "tokenizer.ggml.add_bos_token", str(ggufs[kind]), str(path), "--force"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokenizer.ggml.add_bos_token" not in read_gguf_header(path)[0]
    tok, ref = read_gguf(path).tokenizer, LlamaCppVocab(path)
    assert tok.add_bos == (kind != "gpt-2")
    for text in ("Hello world", "<|im_start|>hi", ""):
        assert tok.encode(text) == ref.tokenize(text, True, True), text


def test_qwen2_normalizes_to_nfc_unlike_llamacpp(ggufs):
    """The one id difference kept on purpose: Qwen2's tokenizer NFC-normalizes text (its tokenizer.json says
    so, transformers does it, the model was trained on it) and llama.cpp skips that step. Composed text, all
    of the strings above, is unaffected; decomposed accents and compatibility characters get the ids
    llama.cpp gives their NFC form."""
    import unicodedata

    from lmforge.loaders.gguf import read_gguf

    tok, ref = read_gguf(ggufs["qwen2"]).tokenizer, LlamaCppVocab(ggufs["qwen2"])
    text = "he\u0301llo cafe\u0301 \u212b"
    nfc = unicodedata.normalize("NFC", text)
    assert nfc != text and ref.tokenize(nfc, True, True) != ref.tokenize(text, True, True)
    assert tok.encode(text) == ref.tokenize(nfc, True, True)
