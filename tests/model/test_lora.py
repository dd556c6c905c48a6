"""LoRA as a module swap (lmforge/model/lora.py): exactness of the wrapped, merged and reloaded model,
what trains, which rows a target touches, refusals, and PEFT compatibility in both directions (the last
group needs `peft` and `transformers`, and is skipped without them)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.model.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRALinear,
    apply_lora,
    available_targets,
    has_lora,
    load_adapter,
    lora_modules,
    lora_parameters,
    merge_lora,
    save_adapter,
)
from lmforge.presets import get_preset

V = 128
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_cfg(**kw) -> ModelConfig:
    return get_preset("tiny", vocab_size=V, **kw)  # RMSNorm, SwiGLU, RoPE, GQA (4 query heads, 2 kv heads)


def gpt2_cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, context_length=64, d_model=64, n_layers=2, n_heads=4, d_ff=128, norm="layernorm",
                       mlp="gelu", positions="learned", attention_bias=True, mlp_bias=True, **kw)


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
        info = apply_lora(m, targets="all-linear", rank=4, alpha=8)
        assert torch.equal(m(idx), ref)
    assert len(info.modules) == 4 * cfg.n_layers and all(isinstance(mod, LoRALinear) for _, mod in lora_modules(m))


@pytest.mark.parametrize("cfg", [llama_cfg(), gpt2_cfg()], ids=["llama", "gpt2"])
def test_merged_forward_equals_unmerged(cfg):
    m = model(cfg)
    idx = ids()
    apply_lora(m, targets="all-linear", rank=4, alpha=16)
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
    info = apply_lora(m, targets=["q_proj", "v_proj", "down_proj"], rank=4, alpha=8)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert {id(p) for p in lora_parameters(m)} == {id(p) for p in m.parameters() if p.requires_grad}
    assert info.trainable_params == sum(p.numel() for p in lora_parameters(m))
    # q and v share one A (4 x 64) with B over their rows (64 + 32); down_proj: A 4 x 192, B 64 x 4.
    assert info.trainable_params == cfg.n_layers * (4 * 64 + (64 + 32) * 4 + 4 * 192 + 64 * 4)
    assert info.total_params == cfg.num_params() + info.trainable_params
    assert info.targets == ["q_proj", "v_proj", "down_proj"] and 0 < info.trainable_fraction < 0.1

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
    info = apply_lora(m, targets=["q_proj", "v_proj"], rank=4, alpha=8)
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


def test_gpt2_vocabulary():
    cfg = gpt2_cfg()
    assert available_targets(cfg)[:5] == ["c_attn", "c_proj", "attn.c_proj", "mlp.c_proj", "c_fc"]
    m = model(cfg)
    info = apply_lora(m, targets=["c_attn", "c_proj"], rank=2, alpha=4)
    assert info.modules == {**{f"blocks.{i}.attn.qkv": ["q", "k", "v"] for i in range(2)},
                            **{f"blocks.{i}.attn.proj": ["o"] for i in range(2)},
                            **{f"blocks.{i}.mlp.proj": ["down"] for i in range(2)}}
    assert info.targets == ["c_attn", "c_proj"]
    m2 = model(cfg)
    info2 = apply_lora(m2, targets="c_fc,mlp.c_proj,v_proj", rank=2, alpha=4)  # Llama names exist as aliases
    assert info2.modules["blocks.0.mlp.fc"] == ["up"] and info2.modules["blocks.0.attn.qkv"] == ["v"]
    assert info2.targets == ["c_attn", "c_fc", "mlp.c_proj"]
    with pytest.raises(UserError, match="'gate_proj' matches no module of this GPT-2-style"):
        apply_lora(model(cfg), targets=["gate_proj"])


def test_unknown_target_lists_the_available_ones():
    with pytest.raises(UserError) as e:
        apply_lora(model(llama_cfg()), targets=["q_proj", "query"], rank=4, alpha=8)
    assert str(e.value) == ("LoRA target 'query' matches no module of this Llama-style (SwiGLU) model; available: "
                            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, all-linear")
    with pytest.raises(UserError, match="available: c_attn, c_proj"):
        apply_lora(model(gpt2_cfg()), targets="c_atn")
    m = model(llama_cfg())
    with pytest.raises(UserError, match="no LoRA targets given"):
        apply_lora(m, targets=[])
    assert not has_lora(m)
    apply_lora(m, targets=["q_proj"])
    with pytest.raises(UserError, match="already has LoRA adapters"):
        apply_lora(m, targets=["v_proj"])


# ---------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, targets", [(llama_cfg(), ["q_proj", "v_proj", "gate_proj", "down_proj"]),
                                          (llama_cfg(), "all-linear"),
                                          (gpt2_cfg(), ["q_proj", "v_proj", "c_fc"])],
                         ids=["llama-subset", "llama-all", "gpt2-slices"])
def test_adapter_round_trip(cfg, targets, tmp_path):
    m = model(cfg)
    apply_lora(m, targets=targets, rank=4, alpha=8, dropout=0.1)
    randomize_lora(m)
    idx = ids()
    with torch.no_grad():
        want = m(idx)
    save_adapter(m, tmp_path, base_model_name_or_path="runs/tiny")
    conf = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert {k: conf[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias",
                                 "base_model_name_or_path", "inference_mode")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1,
        "bias": "none", "base_model_name_or_path": "runs/tiny", "inference_mode": True}
    assert conf["fan_in_fan_out"] is (cfg.mlp == "gelu")  # GPT-2's Conv1D
    assert conf["lmforge"]["base_config"]["d_model"] == cfg.d_model and not list(tmp_path.glob(".*"))

    fresh = model(cfg)
    info = load_adapter(fresh, tmp_path)
    assert info.rank == 4 and info.alpha == 8 and info.dropout == 0.1
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), want, atol=0, rtol=0)
    assert all(n.endswith(("lora_A", "lora_B")) for n, p in fresh.named_parameters() if p.requires_grad)


def test_saved_tensor_names_are_peft_names(tmp_path):
    from safetensors.torch import load_file

    cfg = llama_cfg()
    m = model(cfg)
    apply_lora(m, targets=["q_proj", "v_proj", "up_proj"], rank=4, alpha=8)
    randomize_lora(m)
    save_adapter(m, tmp_path)
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    p = "base_model.model.model.layers.{}."
    want = {f"{p.format(i)}{mod}.lora_{ab}.weight" for i in range(2)
            for mod in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj") for ab in "AB"}
    assert set(tensors) == want
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["target_modules"] == ["q_proj", "v_proj", "up_proj"]
    # The shared A is saved with each projection; B's rows are split by projection.
    qkv = m.blocks[1].attn.qkv
    q = cfg.n_heads * cfg.head_dim
    assert torch.equal(tensors[p.format(1) + "self_attn.q_proj.lora_A.weight"], qkv.lora_A.detach())
    assert torch.equal(tensors[p.format(1) + "self_attn.v_proj.lora_A.weight"], qkv.lora_A.detach())
    assert torch.equal(tensors[p.format(1) + "self_attn.q_proj.lora_B.weight"], qkv.lora_B.detach()[:q])
    assert torch.equal(tensors[p.format(1) + "self_attn.v_proj.lora_B.weight"], qkv.lora_B.detach()[q:])
    assert tensors[p.format(0) + "mlp.up_proj.lora_B.weight"].shape == (cfg.d_ff, 4)


def test_adapter_for_a_different_base_is_refused(tmp_path):
    m = model(llama_cfg())
    apply_lora(m, targets=["q_proj"], rank=4, alpha=8)
    save_adapter(m, tmp_path)
    with pytest.raises(UserError, match=r"made for a different base model \(config differs: d_ff: 192 in the "
                                        r"adapter's base, 256 here\)"):
        load_adapter(model(llama_cfg(d_ff=256)), tmp_path)
    other = model(llama_cfg(), seed=1)  # same shape, other weights
    with pytest.raises(UserError, match="trained on another model.*base weights differ"):
        load_adapter(other, tmp_path)
    assert not has_lora(other)
    load_adapter(other, tmp_path, check_base=False)  # on request: only the shapes must fit
    with pytest.raises(UserError, match="GPT-2-style"):
        load_adapter(model(gpt2_cfg()), tmp_path, check_base=False)
    # The same weights in bf16 are the same base model.
    load_adapter(model(llama_cfg()).to(torch.bfloat16), tmp_path)
    with pytest.raises(UserError, match="no such adapter directory"):
        load_adapter(model(llama_cfg()), tmp_path / "missing")


def test_lora_on_bf16_base_keeps_fp32_adapters():
    m = model(llama_cfg()).to(torch.bfloat16)
    apply_lora(m, targets="all-linear", rank=4, alpha=8)
    assert all(p.dtype == torch.float32 for p in lora_parameters(m))
    randomize_lora(m)
    with torch.no_grad():
        out = m(ids())
        assert out.dtype == torch.bfloat16
        merge_lora(m)
        torch.testing.assert_close(m(ids()), out, atol=0.1, rtol=0.05)  # bf16 rounding of the merged weights


# ---------------------------------------------------------------------------------------------------
# PEFT compatibility (needs peft + transformers)
# ---------------------------------------------------------------------------------------------------
def _hf_pair(cfg: ModelConfig, tmp_path: Path):
    """Our model and the same weights as a transformers model (exported with write_model_files)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from lmforge.loaders.model_dir import write_model_files

    transformers.logging.set_verbosity_error()
    ours = model(cfg)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    write_model_files(hf_dir, ours)

    def load_hf():
        return transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()

    return ours, load_hf


@pytest.mark.parametrize("cfg, targets, arch", [
    (llama_cfg(), ["q_proj", "v_proj", "o_proj", "up_proj"], "LlamaForCausalLM"),
    (llama_cfg(), "all-linear", "LlamaForCausalLM"),
    (gpt2_cfg(), ["q_proj", "v_proj", "c_fc", "attn.c_proj"], "GPT2LMHeadModel"),
], ids=["llama-subset", "llama-all", "gpt2"])
def test_our_adapter_loads_in_peft(cfg, targets, arch, tmp_path):
    ours, load_hf = _hf_pair(cfg, tmp_path)
    import peft

    apply_lora(ours, targets=targets, rank=4, alpha=8)
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    hf = load_hf()
    assert type(hf).__name__ == arch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that it ignores our "lmforge" key
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    idx = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-4, rtol=1e-4)
        merged = theirs.merge_and_unload()
        merge_lora(ours)
        torch.testing.assert_close(ours(idx), merged(idx).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg, peft_kwargs", [
    (llama_cfg(), dict(target_modules=LLAMA_TARGETS)),
    # Different ranks and scales per projection: q, k and v of one fused module get a stacked A (rank 4+2+4).
    (llama_cfg(), dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], rank_pattern={"k_proj": 2},
                       alpha_pattern={"v_proj": 3.0})),
    (llama_cfg(), dict(target_modules=["q_proj", "v_proj"], use_rslora=True, layers_to_transform=[1])),
    (gpt2_cfg(), dict(target_modules=["c_attn", "c_proj", "c_fc"])),
], ids=["llama-all", "llama-patterns", "llama-rslora-one-layer", "gpt2"])
def test_peft_adapter_loads_into_ours(cfg, peft_kwargs, tmp_path):
    ours, load_hf = _hf_pair(cfg, tmp_path)
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load_hf(), peft.LoraConfig(
            r=4, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM", **peft_kwargs)).eval()
        theirs.save_pretrained(tmp_path / "peft")
    idx = ids()
    info = load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        want = theirs(idx).logits
        torch.testing.assert_close(ours(idx), want, atol=1e-4, rtol=1e-4)
    if "rank_pattern" in peft_kwargs:
        assert ours.blocks[0].attn.qkv.lora_A.shape[0] == 4 + 2 + 4  # A stacked, B block-diagonal
    if "layers_to_transform" in peft_kwargs:
        assert set(info.modules) == {"blocks.1.attn.qkv"}

    # Saved back (the stacked A's are written per projection again) and read by peft: the same model.
    save_adapter(ours, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(load_hf(), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, want, atol=1e-4, rtol=1e-4)
