"""Per-tensor types of each file type (llama.cpp's mixing rules), as pure functions of names and shapes; and,
where llama-cpp-python is installed, the same types llama.cpp's own quantizer picks for the same file."""

from __future__ import annotations

import pytest

from lmforge.errors import UserError
from lmforge.quant.mix import (
    FTYPES, base_type, check_ftype, display_name, file_type_name, tensor_types, type_counts, use_more_bits,
)


def shapes(n_layers: int = 8, d: int = 256, ff: int = 512, vocab: int = 1000, kv: int = 128, tied: bool = False):
    s = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    if not tied:
        s["output.weight"] = (vocab, d)
    for i in range(n_layers):
        b = f"blk.{i}."
        s.update({b + "attn_norm.weight": (d,), b + "ffn_norm.weight": (d,), b + "attn_q.weight": (d, d),
                  b + "attn_k.weight": (kv, d), b + "attn_v.weight": (kv, d), b + "attn_output.weight": (d, d),
                  b + "ffn_gate.weight": (ff, d), b + "ffn_up.weight": (ff, d), b + "ffn_down.weight": (d, ff),
                  b + "attn_q.bias": (d,)})
    return s


def test_use_more_bits_picks_first_and_last_eighth_and_every_third_between():
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(6) if use_more_bits(i, 6)] == [2, 5]  # 6 // 8 == 0: no "first eighth"


def test_q4_k_m_mix():
    t = tensor_types(shapes(), "q4_k_m")
    more = {0, 3, 6, 7}
    for i in range(8):
        want = "Q6_K" if i in more else "Q4_K"
        assert t[f"blk.{i}.attn_v.weight"] == want and t[f"blk.{i}.ffn_down.weight"] == want
        for other in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert t[f"blk.{i}.{other}.weight"] == "Q4_K"
        assert t[f"blk.{i}.attn_norm.weight"] == "F32" and t[f"blk.{i}.attn_q.bias"] == "F32"
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K" and t["output_norm.weight"] == "F32"
    assert type_counts(t) == {"Q4_K": 49, "F32": 25, "Q6_K": 9}


def test_q5_k_m_q6_k_q8_0_q4_0():
    t = tensor_types(shapes(), "q5_k_m")
    assert t["blk.0.attn_v.weight"] == "Q6_K" and t["blk.1.attn_v.weight"] == "Q5_K" and t["output.weight"] == "Q6_K"
    assert set(tensor_types(shapes(), "q6_k").values()) == {"Q6_K", "F32"}
    t = tensor_types(shapes(), "q8_0")
    assert t["output.weight"] == "Q8_0" and t["blk.3.ffn_down.weight"] == "Q8_0"
    t = tensor_types(shapes(), "q4_0")  # llama.cpp gives the output projection Q6_K, even in a Q4_0 file
    assert t["output.weight"] == "Q6_K" and t["blk.0.attn_v.weight"] == "Q4_0" and t["token_embd.weight"] == "Q4_0"
    assert set(tensor_types(shapes(), "f16").values()) == {"F16", "F32"}
    assert set(tensor_types(shapes(), "f32").values()) == {"F32"}


def test_tied_embeddings_are_the_output_projection():
    assert tensor_types(shapes(tied=True), "q4_k_m")["token_embd.weight"] == "Q6_K"
    assert tensor_types(shapes(tied=True), "q8_0")["token_embd.weight"] == "Q8_0"


def test_rows_that_do_not_split_fall_back_as_llama_cpp_does():
    # d = 96: no K-quant fits a 96-value row, 32-value types do
    t = tensor_types(shapes(d=96, ff=704, kv=96), "q4_k_m")
    assert t["blk.1.attn_q.weight"] == "Q5_0"  # Q4_K -> Q5_0
    assert t["blk.0.attn_v.weight"] == "Q8_0"  # Q6_K -> Q8_0
    assert t["output.weight"] == "Q8_0"  # 96 % 32 == 0 but the Q6_K it gets does not fit
    assert tensor_types(shapes(d=96), "q5_k_m")["blk.1.attn_q.weight"] == "Q5_1"  # Q5_K -> Q5_1
    t = tensor_types(shapes(d=256, ff=704), "q4_k_m")  # ffn_down rows of 704 = 2.75 super-blocks
    assert t["blk.1.ffn_down.weight"] == "Q5_0" and t["blk.0.ffn_down.weight"] == "Q8_0"
    assert t["blk.1.ffn_up.weight"] == "Q4_K"
    t = tensor_types(shapes(d=72, ff=72, kv=72), "q4_k_m")  # not even 32-value blocks: F16
    assert t["blk.1.attn_q.weight"] == "F16" and t["output.weight"] == "F16"
    t = tensor_types(shapes(d=72, ff=72, kv=72), "q8_0")
    assert t["blk.1.attn_q.weight"] == "F16" and t["output.weight"] == "F16"


def test_names_and_errors():
    assert check_ftype(" Q4_K_M ") == "q4_k_m" and base_type("q6_k") == "Q6_K" and display_name("q4_k_m") == "Q4_K_M"
    assert file_type_name("q5_k_m") == "MOSTLY_Q5_K_M" and file_type_name("f32") == "ALL_F32"
    with pytest.raises(UserError) as e:
        check_ftype("q3_k_s")
    assert "q3_k_s" in str(e.value) and all(f in str(e.value) for f in FTYPES) and "\n" not in str(e.value)


def llama_cpp_types(tmp_path, tokenizer, ftype: str, **shape) -> tuple[dict[str, str], dict[str, str], dict]:
    """(the types llama.cpp's own quantizer gives each tensor of an F32 GGUF we wrote of a random `tiny` model
    reshaped by `shape`, the types `tensor_types` predicts, the tensors we wrote); skips without llama-cpp-python."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    import torch
    from gguf import GGMLQuantizationType as T

    from lmforge.loaders.gguf import read_gguf_header, write_gguf
    from lmforge.model.gpt import GPT
    from lmforge.presets import get_preset

    cfg = get_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=64).replace(**shape)
    torch.manual_seed(0)
    src, dst = tmp_path / "f32.gguf", tmp_path / f"{ftype}.gguf"
    written = write_gguf(src, cfg, GPT(cfg).state_dict(), tokenizer, qtype="f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    theirs = {t.name: T(t.ggml_type).name for t in read_gguf_header(dst)[1]}
    return theirs, tensor_types({t.name: t.shape for t in read_gguf_header(src)[1]}, ftype), written


@pytest.mark.parametrize("ftype", ["q4_k_m", "q5_k_m", "q6_k", "q4_0"])
def test_same_types_as_llama_cpp_quantize(tmp_path, tiny_tokenizer, ftype):
    """llama.cpp's own quantizer, on an F32 GGUF we wrote, picks the types `tensor_types` predicts (8
    layers, K-quant-sized rows in attention, 704-value ffn_down rows that need the fallback)."""
    theirs, ours, written = llama_cpp_types(tmp_path, tiny_tokenizer, ftype, d_model=256, n_layers=8, n_heads=4,
                                            n_kv_heads=2, d_ff=704, tie_embeddings=False)
    assert theirs == ours and set(theirs) == set(written)


def test_eight_experts_get_llama_cpps_attention_bumps():
    s = shapes(n_layers=4)
    for i in range(4):
        s[f"blk.{i}.ffn_gate_exps.weight"] = (8, 512, 256)
    for ftype, out in (("q4_k_m", "Q5_K"), ("q4_0", "Q4_0"), ("q6_k", "Q6_K")):
        t = tensor_types(s, ftype)
        assert {t[f"blk.{i}.attn_{w}.weight"] for i in range(4) for w in "kv"} == {"Q8_0"}
        assert {t[f"blk.{i}.attn_output.weight"] for i in range(4)} == {out}
    s4 = {n: ((4, *v[1:]) if n.endswith("exps.weight") else v) for n, v in s.items()}  # 4 experts: no bump
    assert tensor_types(s4, "q4_k_m")["blk.1.attn_k.weight"] == "Q4_K"


@pytest.mark.parametrize("ftype", ["q4_k_m", "q4_0"])
def test_same_types_as_llama_cpp_quantize_for_eight_experts(tmp_path, tiny_tokenizer, ftype):
    """llama.cpp's quantizer on an 8-expert (Mixtral-shaped) F32 GGUF we wrote picks `tensor_types`' types."""
    theirs, ours, _ = llama_cpp_types(tmp_path, tiny_tokenizer, ftype, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                                      d_ff=256, tie_embeddings=False, n_experts=8, experts_per_token=2)
    assert theirs == ours
