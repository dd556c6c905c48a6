"""Export (lmforge/loaders/gguf/write.py), checked by reading back: F32 round trips are exact for every
architecture variant, quantized ones stay within measured tolerances, rows that do not split into blocks
fall back to F16, and what cannot be exported is refused before anything is written."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import UserError
from lmforge.loaders.gguf import GGUF_TYPES, read_gguf, read_gguf_header, write_gguf
from lmforge.model.gpt import GPT
from lmforge.tokenizer import Tokenizer
from tests.loaders.gguf.helpers import LLAMA3, VARIANTS, T, ids_batch, load, random_model, tiny_cfg


@torch.no_grad()
def greedy(model: GPT, prompt: list[int], n: int = 12) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_round_trip_is_exact(tmp_path, tiny_tokenizer, variant):
    cfg = tiny_cfg(tiny_tokenizer, **VARIANTS[variant])
    model = random_model(cfg)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, model.state_dict(), tiny_tokenizer, qtype="f32", name="tiny")
    g = read_gguf(path)
    assert g.config.diff(cfg) == []
    assert g.config.name == "tiny" and g.file_type == "F32"
    assert set(g.state_dict) == set(model.state_dict())
    assert all(t.dtype == torch.float32 for t in g.state_dict.values())
    back = load(g)
    x = ids_batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=0)
    assert greedy(back, [5, 6, 7]) == greedy(model, [5, 6, 7])
    arch = g.metadata["general.architecture"]
    assert arch == ("qwen2" if cfg.qkv_bias else "llama")
    names = {t.name for t in read_gguf_header(path)[1]}
    assert ("output.weight" in names) == (not cfg.tie_embeddings)
    assert ("rope_freqs.weight" in names) == (variant.startswith("llama3"))


# Max |logit difference| relative to the logits' std, and the least top-1 agreement, measured over 4 seeds
# of these three models (logits std ~1.8): F16 <= 0.002 (agreement 1.0), Q8_0 <= 0.037 (>= 0.958),
# Q4_0 <= 0.45 (>= 0.83; untied, where token_embd itself is 4-bit). The bounds leave ~2x headroom.
QUANT_TOLERANCE = {"f16": (0.005, 1.0), "q8_0": (0.08, 0.9), "q4_0": (1.0, 0.75)}


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("variant", ["llama-gqa-untied", "llama-gqa-tied", "qwen2-qkv-bias"])
def test_quantized_logits_close(tmp_path, tiny_tokenizer, qtype, variant):
    cfg = tiny_cfg(tiny_tokenizer, **VARIANTS[variant])
    model = random_model(cfg, emb_scale=20.0)
    path = tmp_path / f"m-{qtype}.gguf"
    write_gguf(path, cfg, model.state_dict(), tiny_tokenizer, qtype=qtype)
    g = read_gguf(path)
    assert g.file_type == qtype.upper()
    x = ids_batch(cfg)
    with torch.no_grad():
        ref, out = model(x), load(g)(x)
    rel_diff = ((out - ref).abs().max() / ref.std()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    bound, min_agree = QUANT_TOLERANCE[qtype]
    assert rel_diff < bound and agree >= min_agree, (qtype, rel_diff, agree, ref.std().item())
    _, infos = read_gguf_header(path)
    types = {t.name: T(t.ggml_type).name for t in infos}
    assert types["output_norm.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    big = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[qtype]
    assert types["blk.0.ffn_down.weight"] == big
    if qtype == "q4_0":  # the output projection keeps more precision, as llama.cpp does
        assert types["token_embd.weight" if cfg.tie_embeddings else "output.weight"] == "Q8_0"


def test_rows_that_do_not_split_into_blocks_fall_back_to_f16(tmp_path, tiny_tokenizer):
    cfg = tiny_cfg(tiny_tokenizer, d_ff=72)  # ffn_down rows of 72 values: not a multiple of 32
    model = random_model(cfg)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, model.state_dict(), tiny_tokenizer, qtype="q8_0")
    types = {t.name: T(t.ggml_type).name for t in read_gguf_header(path)[1]}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"
    x = ids_batch(cfg)
    with torch.no_grad():
        assert (load(read_gguf(path))(x) - model(x)).abs().max() < 0.05


def test_export_refusals(tmp_path, tiny_tokenizer):
    import tokenizers
    from tokenizers import models

    path = tmp_path / "x.gguf"
    cfg = tiny_cfg(tiny_tokenizer)
    sd = random_model(cfg).state_dict()
    gpt2 = tiny_cfg(tiny_tokenizer, norm="layernorm", mlp="gelu", positions="learned")
    cases = [
        (lambda: write_gguf(path, gpt2, GPT(gpt2).state_dict(), tiny_tokenizer), "Llama- and Qwen2-shaped"),
        (lambda: write_gguf(path, cfg, sd, tiny_tokenizer, qtype="q5_k"), "q8_0"),
        (lambda: write_gguf(path, cfg, {k: v for k, v in sd.items() if "blocks.1.mlp" not in k}, tiny_tokenizer), "no tensor 'blocks.1.mlp.fc.weight'"),
        (lambda: write_gguf(path, cfg.replace(qkv_bias=True, rope_scaling=LLAMA3),
                            random_model(cfg.replace(qkv_bias=True)).state_dict(), tiny_tokenizer), "qwen2"),
        (lambda: write_gguf(path, tiny_cfg(tiny_tokenizer, vocab_size=100), sd, tiny_tokenizer), "tokenizer has"),
    ]
    wordlevel = Tokenizer(tokenizers.Tokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a")),
                          bos_token=None, eos_token="<|endoftext|>", eot_token=None, pad_token=None)
    cases.append((lambda: write_gguf(path, cfg, sd, wordlevel), "byte-level BPE"))
    extra = {**sd, "blocks.0.attn.qkv.lora_A": torch.zeros(2, 2)}
    cases.append((lambda: write_gguf(path, cfg, extra, tiny_tokenizer), "unexpected tensor 'blocks.0.attn.qkv.lora_A'"))
    for fn, needle in cases:
        with pytest.raises(UserError, match=needle.replace("(", r"\(")):
            fn()
        assert not path.exists() and list(tmp_path.iterdir()) == []


def test_gguf_types_constant():
    assert GGUF_TYPES == ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
