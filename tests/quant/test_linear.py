"""GGMLLinear against F.linear on gguf-py's dequantized weight, and a module swap into a tiny GPT.

Tolerance: the weights are bit-identical (tests/quant/test_ggml.py), so the only difference is the order of
float32 sums in tiled vs whole-matrix matmuls: rtol 1e-5, atol 1e-5 for a layer, 1e-4 for GPT logits.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.quant import GGMLLinear, packed_nbytes, quantize, swap_in

TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """These tests hold the PyTorch path (what runs without a compiler) to float32 exactness; the compiled
    kernels, which quantize activations to int8, are held to their own tolerance in test_kernels.py."""
    from lmforge.quant import linear

    monkeypatch.setattr(linear, "_kernels", lambda: None)


def gguf_weight(packed: torch.Tensor, name: str, shape: tuple[int, int]) -> torch.Tensor:
    out = quants.dequantize(packed.numpy().reshape(shape[0], -1), GGMLQuantizationType[name])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


@pytest.mark.parametrize("name", TYPES)
def test_forward_matches_f_linear_on_the_gguf_weight(name):
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = 40, 64
    w, b = torch.randn(out_f, in_f, generator=gen), torch.randn(out_f, generator=gen)
    packed = quantize(w, name)
    ref_w = gguf_weight(packed, name, (out_f, in_f))
    layer = GGMLLinear(packed, name, in_f, out_f, bias=b, tile_rows=16)  # 3 tiles, the last one short
    assert torch.equal(layer.dequantized(), ref_w)
    for rows in range(1, 34):
        x = torch.randn(rows, in_f, generator=gen)
        torch.testing.assert_close(layer(x), F.linear(x, ref_w, b), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 5, in_f, generator=gen)  # leading batch dimensions, no bias
    nobias = GGMLLinear(packed, name, in_f, out_f, tile_rows=7)
    torch.testing.assert_close(nobias(x), F.linear(x, ref_w), rtol=1e-5, atol=1e-5)


def test_holds_bytes_not_parameters():
    packed = quantize(torch.randn(96, 256), "Q4_0")
    layer = GGMLLinear(packed, 2, 256, 96, bias=torch.zeros(96))
    assert layer.nbytes == packed_nbytes("Q4_0", (96, 256)) == 96 * 8 * 18  # 4.5 bits a value
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert layer.state_dict()["part0"].dtype == torch.uint8
    layer.to(torch.bfloat16)  # a model-wide cast leaves the bytes alone and computes in the new dtype
    assert layer.packed.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(3, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert "Q4_0" in repr(layer)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, context_length=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_1"])
@pytest.mark.parametrize("cfg", [tiny(), tiny(norm="layernorm", mlp="gelu", positions="learned",
                                              attention_bias=True, mlp_bias=True, tie_embeddings=False)],
                         ids=["llama-tied", "gpt2-biases"])
def test_swap_in_gives_the_logits_of_the_dequantized_model(name, cfg):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.5 if n.endswith("weight") else 0.0, 0.2)  # norms and biases matter too
    reference = copy.deepcopy(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "lm_head" in linears and "blocks.1.mlp.fc" in linears
    for n in linears:
        w = model.get_submodule(n).weight
        packed = quantize(w, name)
        new = swap_in(model, n, packed, name, tuple(w.shape))
        assert isinstance(model.get_submodule(n), GGMLLinear) and new is model.get_submodule(n)
        # untie as swap_in does: the reference's tok_emb keeps the float matrix
        reference.get_submodule(n).weight = nn.Parameter(gguf_weight(packed, name, tuple(w.shape)))
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx), rtol=1e-4, atol=1e-4)


def test_swap_in_errors_are_one_line():
    model = GPT(tiny())
    packed = quantize(torch.randn(32, 32), "Q8_0")
    for fn, word in [(lambda: swap_in(model, "blocks.0.nope", packed, "Q8_0"), "nope"),
                     (lambda: swap_in(model, "tok_emb", packed, "Q8_0"), "Embedding"),
                     (lambda: swap_in(model, "blocks.0.attn.proj", packed, "Q8_0", (64, 32)), "64x32"),
                     (lambda: swap_in(model, "blocks.0.mlp.fc", packed, "Q8_0"), "bytes"),
                     (lambda: GGMLLinear(packed, "Q8_0", 32, 32, bias=torch.zeros(3)), "bias"),
                     (lambda: GGMLLinear(packed, "IQ4_XS", 32, 32), "IQ4_XS")]:
        with pytest.raises(UserError) as err:
            fn()
        assert "\n" not in str(err.value) and word in str(err.value), str(err.value)


def test_the_model_never_imports_quant():
    """Practice 7: quantization is swapped in from outside; lmforge/model stays unaware of it."""
    model_dir = Path(__file__).resolve().parents[2] / "lmforge" / "model"
    for path in model_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any("quant" in n.split(".") for n in names), path


def test_forward_decodes_one_tile_at_a_time(monkeypatch):
    """Peak extra memory is one tile of rows in fp32: forward never asks for the whole matrix."""
    import lmforge.quant.linear as linear

    seen = []
    real = linear.dequantize
    monkeypatch.setattr(linear, "dequantize", lambda p, q, shape: seen.append(shape) or real(p, q, shape))
    layer = GGMLLinear(quantize(torch.randn(40, 64), "Q4_1"), "Q4_1", 64, 40, tile_rows=16)
    layer(torch.randn(3, 64))
    assert seen == [(16, 64), (16, 64), (8, 64)]
