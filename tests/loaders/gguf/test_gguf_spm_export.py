"""Export of SentencePiece vocabularies as llama.cpp's `llama` tokenizer (issue 17: a Gemma or Phi-3-mini read
from a GGUF made by llama.cpp's converter, fine-tuned here, goes back to GGUF with its own vocabulary).

The tokenizer lmforge rebuilds from a `llama` vocabulary is a byte-fallback BPE over "▁"-joined text; written
back, its pieces keep their ids and types (BYTE for <0xXX>, UNKNOWN, CONTROL, USER_DEFINED, UNUSED), its merge
order becomes scores (SentencePiece joins the best-scoring pair), and add_space_prefix says whether a "▁"
goes in front. llama.cpp's own tokenizer on our file gives the ids and text it gives on the converter's
(tests/loaders/gguf/test_gguf_vs_llamacpp.py's checks), and lmforge reads it back to the same tokenizer.
Needs llama-cpp-python, sentencepiece and llama.cpp's converter (skipped without them).
"""

from __future__ import annotations

import pytest

from lmforge.loaders.gguf import read_gguf, write_gguf
from lmforge.loaders.gguf.reader import parse_file
from tests.loaders.gguf.helpers import random_model
from tests.loaders.gguf.test_gguf_vs_llamacpp import (
    TRICKY,
    LlamaCppVocab,
    _requirements,
    build_gguf,
    compare,
    random_texts,
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    why = _requirements()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("spm_export")
    return {kind: build_gguf(kind, work) for kind in ("spm", "spm-noprefix")}


@pytest.mark.parametrize("kind", ["spm", "spm-noprefix"])
def test_a_sentencepiece_vocabulary_goes_back_to_gguf(converted, kind, tmp_path):
    src = converted[kind]
    g = read_gguf(src)
    path = tmp_path / "ours.gguf"
    cfg = g.config.replace(n_layers=1)
    write_gguf(path, cfg, random_model(cfg).state_dict(), g.tokenizer, qtype="f32")
    theirs, ours = parse_file(src).metadata, parse_file(path).metadata
    assert ours["tokenizer.ggml.model"] == "llama"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id"):
        assert ours[key] == theirs[key], key
    prefix = "tokenizer.ggml.add_space_prefix"  # llama.cpp's default: true
    assert ours[prefix] == theirs.get(prefix, True) == (kind == "spm")
    assert ours["tokenizer.ggml.unknown_token_id"] == 0  # <unk>: the id llama.cpp assumes without the key
    back = read_gguf(path).tokenizer
    ref = LlamaCppVocab(path)
    failed = []
    for text in TRICKY + random_texts(300):
        assert back.encode(text, add_bos=None) == g.tokenizer.encode(text, add_bos=None), text
        for check, ok in compare(back, ref, text, "spm" if kind == "spm" else "spm-noprefix").items():
            if not ok:
                failed.append(f"{check}: {text!r}")
    assert not failed, "\n".join(failed)
