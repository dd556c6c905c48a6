"""GGUF files loaded with their matrices kept packed (`dtype="auto"`, the default of the commands that run a
model): the model holds the file's bytes, not float copies, and computes what the dequantized float32 model
computes.

Tolerances. With the PyTorch path (kernels off) the weights are bit-identical to the dequantized ones and
only the order of float32 sums differs: 1e-4 on logits. With the compiled kernels, integer types multiply
int8-quantized activations (one scale per 32 or 256 values, as llama.cpp does): each dot product is off by
about 1/127 of a block's largest activation times its weights, which on these tiny random models stays
under 2 % of the logits' spread; greedy decoding on a Q8_0 model is identical to the float32 model's.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lmforge.errors import UserError
from lmforge.loaders.auto import load as auto_load
from lmforge.loaders.gguf import load_gguf_packed, read_gguf, write_gguf
from lmforge.quant import linear as qlinear
from lmforge.quant.linear import GGMLEmbedding, GGMLLinear, stored_nbytes
from tests.loaders.gguf.helpers import (T, ids_batch, llama_hp, load, random_model, tiny_cfg, tokenizer_kv,
                                        transformers_model, write_llamacpp_style)


@pytest.fixture
def torch_only(monkeypatch):
    """Force the PyTorch tile-decoding path (what runs without a compiler)."""
    monkeypatch.setattr(qlinear, "_kernels", lambda: None)


def greedy(model, prompt: list[int], n: int = 12) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids)[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("tied", [False, True])
def test_packed_model_computes_the_dequantized_models_logits(tmp_path, tiny_tokenizer, torch_only, qtype, tied):
    cfg = tiny_cfg(tiny_tokenizer, tie_embeddings=tied)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_model(cfg).state_dict(), tiny_tokenizer, qtype=qtype)
    reference = load(read_gguf(path))
    model, g = load_gguf_packed(path)
    assert g.config == reference.config
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [], "every matrix stays packed"
    assert isinstance(model.tok_emb, GGMLEmbedding) and isinstance(model.lm_head, GGMLLinear)
    if tied:  # the head reads the embedding's bytes: one copy
        assert model.lm_head.part0.data_ptr() == model.tok_emb.packed.data_ptr()
    x = ids_batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)


def test_weights_take_their_stored_size(tmp_path, tiny_tokenizer):
    cfg = tiny_cfg(tiny_tokenizer, tie_embeddings=True)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_model(cfg).state_dict(), tiny_tokenizer, qtype="q4_0")
    model, _ = load_gguf_packed(path)
    header = gguf.GGUFReader(str(path))
    file_bytes = sum(int(t.n_bytes) for t in header.tensors)
    tables = model.rope_cos.numel() * 4 * 2
    assert stored_nbytes(model) == file_bytes + tables
    fp32 = sum(p.numel() for p in load(read_gguf(path)).parameters()) * 4
    assert stored_nbytes(model) - tables < fp32 / 3  # Q4_0 / Q8_0 mix vs fp32


def test_mixed_types_within_a_fused_projection_and_k_quants(tmp_path, tiny_tokenizer, torch_only):
    """q, k and v of one layer in three types, ffn_down in Q4_K / Q6_K (as llama.cpp's _M mixes do)."""
    hf = transformers_model("llama", tiny_tokenizer.vocab_size, tied=True)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    rng = np.random.default_rng(0)
    types = {}
    for name, qt in [("blk.0.attn_q.weight", T.Q8_0), ("blk.0.attn_k.weight", T.Q4_0),
                     ("blk.0.attn_v.weight", T.Q5_1)]:
        hf_name = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj"}[name.split(".")[2]]
        w = sd[f"model.layers.0.self_attn.{hf_name}.weight"].numpy()
        types[name] = (gguf.quants.quantize(w, qt), qt)
    for layer, (qt, d_at) in enumerate([(T.Q6_K, slice(208, 210)), (T.Q4_K, slice(0, 4))]):
        raw = rng.integers(0, 256, size=(64, gguf.GGML_QUANT_SIZES[qt][1]), dtype=np.uint8)
        raw[:, d_at] = np.full((64, (d_at.stop - d_at.start) // 2), 0.01, dtype=np.float16).view(np.uint8)
        types[f"blk.{layer}.ffn_down.weight"] = (raw, qt)
    path = tmp_path / "mixed.gguf"
    write_llamacpp_style(path, "llama", llama_hp(), sd, tokenizer_kv(tiny_tokenizer), types=types)
    reference = load(read_gguf(path))
    model, _ = load_gguf_packed(path)
    qkv = model.blocks[0].attn.qkv
    assert [p.qtype for p in qkv.parts] == ["Q8_0", "Q4_0", "Q5_1"] and qkv.qtype.startswith("mixed")
    assert model.blocks[1].mlp.proj.qtype == "Q4_K"
    x = ids_batch(reference.config)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_kernels_stay_close_and_q8_0_decodes_the_same_tokens(tmp_path, tiny_tokenizer, qtype):
    cfg = tiny_cfg(tiny_tokenizer, tie_embeddings=False)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_model(cfg, emb_scale=4.0).state_dict(), tiny_tokenizer, qtype=qtype)
    reference = load(read_gguf(path))
    model, _ = load_gguf_packed(path)
    x = ids_batch(cfg)
    with torch.no_grad():
        want, got = reference(x), model(x)
    spread = (want.max() - want.min()).item()
    assert (got - want).abs().max().item() < 0.02 * spread
    if qtype == "q8_0":
        assert greedy(model, [1, 2, 3]) == greedy(reference, [1, 2, 3])


def test_backward_reaches_the_input_not_the_bytes(tmp_path, tiny_tokenizer, torch_only):
    """What QLoRA needs: gradients through a frozen packed layer, equal to the float layer's."""
    cfg = tiny_cfg(tiny_tokenizer)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_model(cfg).state_dict(), tiny_tokenizer, qtype="q8_0")
    model, _ = load_gguf_packed(path)
    layer = model.blocks[0].mlp.proj
    w = layer.dequantized()
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    layer(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ w.T).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)


def test_an_unsupported_type_is_one_line_naming_it(tmp_path, tiny_tokenizer):
    hf = transformers_model("llama", tiny_tokenizer.vocab_size, tied=True)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    raw = np.zeros((256, gguf.GGML_QUANT_SIZES[T.IQ4_NL][1] * 2), dtype=np.uint8)
    path = tmp_path / "iq.gguf"
    write_llamacpp_style(path, "llama", llama_hp(), sd, tokenizer_kv(tiny_tokenizer),
                         types={"blk.0.ffn_gate.weight": (raw, T.IQ4_NL)})
    with pytest.raises(UserError) as exc:
        load_gguf_packed(path)
    msg = str(exc.value)
    assert "\n" not in msg and "IQ4_NL" in msg and "blk.0.ffn_gate.weight" in msg and str(path) in msg


def test_auto_load_keeps_gguf_packed_and_bf16_safetensors_16_bit(tmp_path, tiny_tokenizer, torch_only):
    from lmforge.loaders.model_dir import write_model_files

    cfg = tiny_cfg(tiny_tokenizer, tie_embeddings=True)
    path = tmp_path / "m.gguf"
    source = random_model(cfg)
    write_gguf(path, cfg, source.state_dict(), tiny_tokenizer, qtype="q8_0")
    loaded = auto_load(path, dtype="auto")
    assert isinstance(loaded.model.blocks[0].attn.qkv, GGMLLinear) and loaded.format == "gguf:Q8_0"
    assert isinstance(auto_load(path).model.blocks[0].attn.qkv, torch.nn.Linear)  # the library default: fp32

    d = tmp_path / "bf16"
    d.mkdir()
    write_model_files(d, source.to(torch.bfloat16), tokenizer=tiny_tokenizer)
    stored = auto_load(d, dtype="auto").model
    qkv = stored.blocks[0].attn.qkv
    assert isinstance(qkv, GGMLLinear) and qkv.qtype == "BF16"
    assert stored.blocks[0].norm1.weight.dtype == torch.float32
    full = auto_load(d).model  # fp32 of the same bf16 values
    x = ids_batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(stored(x), full(x), atol=1e-4, rtol=1e-4)
