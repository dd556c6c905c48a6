"""Loading GGUF files others wrote (lmforge/loaders/gguf/load.py): llama.cpp's layout gives transformers'
logits, the dtype argument, and files that are valid GGUF but not a usable model, each refused with one
line naming the file and what is wrong."""

from __future__ import annotations

import gguf
import pytest
import torch

from lmforge.errors import UserError
from lmforge.loaders.gguf import read_gguf, write_gguf
from tests.loaders.gguf.helpers import (assert_user_error, ids_batch, llama_hp, load, random_model, tiny_cfg,
                                        tokenizer_kv, transformers_model, write_llamacpp_style)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", True)])
def test_llamacpp_layout_matches_transformers(tmp_path, tiny_tokenizer, arch, tied):
    hf = transformers_model(arch, tiny_tokenizer.vocab_size, tied)
    sd = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    path = tmp_path / "hf.gguf"
    write_llamacpp_style(path, arch, llama_hp(), sd, tokenizer_kv(tiny_tokenizer))
    g = read_gguf(path)
    assert g.config.tie_embeddings == tied and g.config.qkv_bias == (arch == "qwen2")
    x = ids_batch(g.config)
    with torch.no_grad():
        torch.testing.assert_close(load(g)(x), hf(x).logits, atol=1e-4, rtol=0)


def test_dtype_argument(tmp_path, tiny_tokenizer):
    cfg = tiny_cfg(tiny_tokenizer)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_model(cfg).state_dict(), tiny_tokenizer, qtype="f16")
    g = read_gguf(path, dtype=torch.bfloat16)
    assert {t.dtype for t in g.state_dict.values()} == {torch.bfloat16}


# name -> (changes to a llama.cpp-style file, words the message must contain)
SEMANTIC_CASES = {
    "missing-tensor": (dict(skip_tensors={"blk.1.ffn_down.weight"}), "blk.1.ffn_down.weight"),
    "missing-block-count": (dict(skip_keys={"llama.block_count"}), "llama.block_count"),
    "missing-rms-eps": (dict(skip_keys={"llama.attention.layer_norm_rms_epsilon"}), "layer_norm_rms_epsilon"),
    "missing-tokens": (dict(skip_keys={"tokenizer.ggml.tokens"}), "tokenizer.ggml.tokens"),
    "missing-architecture-key": (dict(skip_keys={"general.architecture"}), "general.architecture"),
    "unknown-pre": (dict(kv={"tokenizer.ggml.pre": "tekken"}), "tekken"),
    "unknown-tokenizer-model": (dict(kv={"tokenizer.ggml.model": "bert"}), "bert"),
    "bos-out-of-range": (dict(kv={"tokenizer.ggml.bos_token_id": (10**6, gguf.GGUFValueType.UINT32)}), "bos_token_id"),
    "hparam-wrong-type": (dict(kv={"llama.block_count": "two"}), "llama.block_count"),
    "kv-head-count-mismatch": (dict(kv={"llama.attention.head_count_kv": (4, gguf.GGUFValueType.UINT32)}), "shape"),
    "rope-dims-partial": (dict(kv={"llama.rope.dimension_count": (8, gguf.GGUFValueType.UINT32)}), "rope.dimension_count"),
    "yarn": (dict(kv={"llama.rope.scaling.type": "yarn"}), "yarn"),
    "split-file": (dict(kv={"split.count": (3, gguf.GGUFValueType.UINT16)}), "split into 3 files"),
    "infinite-rope-base": (dict(kv={"llama.rope.freq_base": (float("inf"), gguf.GGUFValueType.FLOAT32)}), "finite"),
}


@pytest.mark.parametrize("case", SEMANTIC_CASES)
def test_unusable_models_are_one_line_user_errors(tmp_path, tiny_tokenizer, case):
    hf = transformers_model("llama", tiny_tokenizer.vocab_size, tied=False)
    change, needle = SEMANTIC_CASES[case]
    kv = {**tokenizer_kv(tiny_tokenizer), **change.get("kv", {})}
    path = tmp_path / f"{case}.gguf"
    write_llamacpp_style(path, "llama", llama_hp(), hf.state_dict(), kv,
                         skip_keys=change.get("skip_keys", ()), skip_tensors=change.get("skip_tensors", ()))
    with pytest.raises(UserError) as exc:
        read_gguf(path)
    assert_user_error(exc, path)
    assert needle in str(exc.value)


# ---------------------------------------------------------------------------------------------------
# Absurd metadata: refused before anything is allocated from it
# ---------------------------------------------------------------------------------------------------
def test_absurd_context_and_layers_are_refused_from_the_header(tmp_path, tiny_tokenizer):
    from lmforge.loaders.gguf import describe_gguf

    hf = transformers_model("llama", tiny_tokenizer.vocab_size, tied=False)
    U32, U64 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.UINT64
    for key, value, needle in (("llama.context_length", (2**40, U64), "beyond what lmforge supports"),
                               ("llama.block_count", (10**4, U32), "block_count 10000")):
        path = tmp_path / f"{key}.gguf"
        write_llamacpp_style(path, "llama", llama_hp(), hf.state_dict(), {**tokenizer_kv(tiny_tokenizer), key: value})
        for call in (read_gguf, describe_gguf):
            with pytest.raises(UserError) as exc:
                call(path)
            assert_user_error(exc, path)
            assert needle in str(exc.value)


def test_rope_tables_that_would_not_fit_are_refused_before_they_are_computed(tmp_path, tiny_tokenizer, monkeypatch):
    """A context within the ceiling (2**22) whose RoPE tables (512 MiB for head_dim 16) exceed the memory
    available: before, they were computed whatever the memory; now the load stops first."""
    from lmforge.loaders import packed
    from lmforge.loaders.auto import load as load_any
    from tests.loaders.test_model_dir import tables_computed

    cfg = tiny_cfg(tiny_tokenizer)
    path = tmp_path / "long.gguf"
    write_gguf(path, cfg.replace(context_length=2**22), random_model(cfg).state_dict(), tiny_tokenizer, qtype="f32")
    computed = tables_computed(monkeypatch)
    monkeypatch.setattr(packed, "available_memory", lambda: 100 << 20)
    with pytest.raises(UserError) as exc:
        load_any(path)
    assert_user_error(exc, path)
    assert "context of 4194304 tokens" in str(exc.value) and computed == []


def test_tokenizer_larger_than_the_embedding_is_refused_at_import(tmp_path, tiny_tokenizer):
    """Before: `lmforge import` (describe_gguf) accepted it; only loading refused it."""
    from lmforge.loaders.gguf import describe_gguf
    from lmforge.store import import_model

    hf = transformers_model("llama", tiny_tokenizer.vocab_size - 20, tied=False)
    path = tmp_path / "small-vocab.gguf"
    write_llamacpp_style(path, "llama", llama_hp(), hf.state_dict(), tokenizer_kv(tiny_tokenizer))
    for call in (describe_gguf, read_gguf, lambda p: import_model(p, "small-vocab")):
        with pytest.raises(UserError) as exc:
            call(path)
        assert_user_error(exc, path)
        assert "the tokenizer has 320 tokens but the model's embedding only 300 rows" in str(exc.value)
    assert describe_gguf(path, check_tokenizer=False)["config"].vocab_size == 300  # `lmforge list` still describes it
