"""LoRA as a module swap (lmforge/model/lora.py), in our own names (projections and their parts): exactness
of the wrapped and merged model, what trains, which rows a target touches, refusals. Hugging Face / PEFT
target names and adapter files are tested in tests/loaders/test_peft.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.model.gpt import GPT, PROJECTIONS, projection_parts
from lmforge.model.lora import (
    LoRALinear,
    apply_lora,
    has_lora,
    lora_modules,
    lora_parameters,
    merge_lora,
)
from lmforge.presets import get_preset

V = 128


def llama_cfg(**kw) -> ModelConfig:
    return get_preset("tiny", vocab_size=V, **kw)  # RMSNorm, SwiGLU, RoPE, GQA (4 query heads, 2 kv heads)


def gpt2_cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, context_length=64, d_model=64, n_layers=2, n_heads=4, d_ff=128, norm="layernorm",
                       mlp="gelu", positions="learned", attention_bias=True, mlp_bias=True, **kw)


def every_part(cfg: ModelConfig) -> dict[str, list[str]]:
    """Every projection, every part: PEFT's all-linear in our names."""
    return {m: [p for p, _, _ in projection_parts(cfg, m)] for m in PROJECTIONS}


def model(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def ids(batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(1))


def randomize_lora(m: nn.Module, seed: int = 2) -> None:
    """Non-zero B everywhere (as after training), so that the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in lora_modules(m):
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.1)


# ---------------------------------------------------------------------------------------------------
# The module swap
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [llama_cfg(), gpt2_cfg()], ids=["llama", "gpt2"])
def test_zero_b_equals_base_exactly(cfg):
    m = model(cfg)
    idx = ids()
    with torch.no_grad():
        ref = m(idx)
        info = apply_lora(m, targets=every_part(cfg), rank=4, alpha=8)
        assert torch.equal(m(idx), ref)
    assert len(info.modules) == 4 * cfg.n_layers and all(isinstance(mod, LoRALinear) for _, mod in lora_modules(m))


@pytest.mark.parametrize("cfg", [llama_cfg(), gpt2_cfg()], ids=["llama", "gpt2"])
def test_merged_forward_equals_unmerged(cfg):
    m = model(cfg)
    idx = ids()
    apply_lora(m, targets=every_part(cfg), rank=4, alpha=16)
    randomize_lora(m)
    with torch.no_grad():
        unmerged = m(idx)
        assert not torch.allclose(unmerged, model(cfg)(idx), atol=1e-3)  # the adapters do something
        merge_lora(m)
        torch.testing.assert_close(m(idx), unmerged, atol=1e-5, rtol=1e-5)
    # A plain GPT again: plain Linears, the base model's parameter names, everything trainable.
    assert not has_lora(m)
    assert all(type(getattr(b.attn, n)) is nn.Linear for b in m.blocks for n in ("qkv", "proj"))
    assert set(m.state_dict()) == set(model(cfg).state_dict())
    assert all(p.requires_grad for p in m.parameters())


def test_only_lora_parameters_train():
    cfg = llama_cfg()
    m = model(cfg)
    info = apply_lora(m, targets={"attn.qkv": ["v", "q"], "mlp.proj": ["down"]}, rank=4, alpha=8)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert {id(p) for p in lora_parameters(m)} == {id(p) for p in m.parameters() if p.requires_grad}
    assert info.trainable_params == sum(p.numel() for p in lora_parameters(m))
    # q and v share one A (4 x 64) with B over their rows (64 + 32); down_proj: A 4 x 192, B 64 x 4.
    assert info.trainable_params == cfg.n_layers * (4 * 64 + (64 + 32) * 4 + 4 * 192 + 64 * 4)
    assert info.total_params == cfg.num_params() + info.trainable_params
    assert info.targets == ["attn.qkv.q", "attn.qkv.v", "mlp.proj.down"] and 0 < info.trainable_fraction < 0.1

    m.train()
    m(ids()).logsumexp(-1).mean().backward()
    for name, p in m.named_parameters():
        if name.endswith("lora_B"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif not name.endswith("lora_A"):  # (A's gradient is exactly zero while B is zero)
            assert p.grad is None, name


def test_target_subset_touches_only_those_rows():
    cfg = llama_cfg()
    m = model(cfg)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    info = apply_lora(m, targets={"attn.qkv": ["q", "v"]}, rank=4, alpha=8)
    assert info.modules == {f"blocks.{i}.attn.qkv": ["q", "v"] for i in range(cfg.n_layers)}
    randomize_lora(m)

    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    qkv = m.blocks[0].attn.qkv
    x = torch.randn(3, cfg.d_model)
    with torch.no_grad():
        y, y0 = qkv(x), x @ base["blocks.0.attn.qkv.weight"].t()
    torch.testing.assert_close(y[:, q:q + kv], y0[:, q:q + kv], atol=0, rtol=0)  # k: untouched
    assert not torch.allclose(y[:, :q], y0[:, :q]) and not torch.allclose(y[:, q + kv:], y0[:, q + kv:])

    merge_lora(m)
    for name, w in m.state_dict().items():
        if name.endswith("attn.qkv.weight"):
            assert torch.equal(w[q:q + kv], base[name][q:q + kv]), name  # k rows
            assert not torch.equal(w[:q], base[name][:q]) and not torch.equal(w[q + kv:], base[name][q + kv:])
        else:
            assert torch.equal(w, base[name]), name  # o_proj, MLP, norms, embeddings


def test_targets_are_our_projections_and_parts():
    m = model(llama_cfg())
    with pytest.raises(TypeError, match="lmforge.loaders.peft.apply_lora"):
        apply_lora(m, targets="q_proj,v_proj")  # PEFT's names are the loaders' business
    with pytest.raises(UserError, match="'attn.q' is not a projection of this model; LoRA adapts attn.qkv, attn.proj"):
        apply_lora(m, targets={"attn.q": ["q"]})
    with pytest.raises(UserError, match=r"mlp.fc has the parts gate, up; asked for \['down'\]"):
        apply_lora(m, targets={"mlp.fc": ["down"]})
    with pytest.raises(UserError, match="no LoRA targets given"):
        apply_lora(m, targets={})
    assert not has_lora(m)
    info = apply_lora(m, targets={"mlp.fc": ["up"]}, rank=2, alpha=4)
    assert info.modules == {f"blocks.{i}.mlp.fc": ["up"] for i in range(2)} and info.targets == ["mlp.fc.up"]
    with pytest.raises(UserError, match="already has LoRA adapters"):
        apply_lora(m, targets={"attn.qkv": ["v"]})
    assert projection_parts(gpt2_cfg(), "mlp.fc") == [("up", 0, 128)]  # GELU: no gate


def test_lora_on_bf16_base_keeps_fp32_adapters():
    m = model(llama_cfg()).to(torch.bfloat16)
    apply_lora(m, targets=every_part(m.config), rank=4, alpha=8)
    assert all(p.dtype == torch.float32 for p in lora_parameters(m))
    randomize_lora(m)
    with torch.no_grad():
        out = m(ids())
        assert out.dtype == torch.bfloat16
        merge_lora(m)
        torch.testing.assert_close(m(ids()), out, atol=0.1, rtol=0.05)  # bf16 rounding of the merged weights
