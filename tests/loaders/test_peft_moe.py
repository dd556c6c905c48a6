"""LoRA on mixtures of experts in PEFT's names (lmforge/loaders/peft.py, peft_experts.py): the target names of
Mixtral (w1 / w3 / w2, gate) and Qwen3-MoE (gate_proj / up_proj / down_proj, mlp.gate), an expert target on every
expert and the router only by name; adapter files with one module per expert under the names PEFT writes for
them; and peft itself (on transformers 5, whose experts are fused 3-D parameters it converts our per-expert names
into) giving our logits with our adapter, and we giving peft's with the fused adapter it writes there."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.loaders.hf import MIXTRAL, QWEN3_MOE, hf_architecture
from lmforge.loaders.peft import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_lora, available_targets, load_adapter,
                                  save_adapter)
from lmforge.model.lora import has_lora, lora_modules, merge_lora
from tests.model.test_lora import randomize_lora
from tests.model.test_lora_moe import E, ids, moe_cfg, moe_model

LLAMA_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def mixtral_cfg() -> ModelConfig:
    return moe_cfg()


def qwen3_moe_cfg() -> ModelConfig:
    """Qwen3-MoE's shape: q/k norms, head_dim apart from d_model / heads, routing weights not renormalised."""
    return moe_cfg(qk_norm=True, head_dim=12, norm_topk_prob=False)


def experts(layer: int, template: str) -> set[str]:
    return {f"blocks.{layer}.mlp.experts.{e}.{template}" for e in range(E)}


# ---------------------------------------------------------------------------------------------------
# Target names
# ---------------------------------------------------------------------------------------------------
def test_mixtral_vocabulary():
    cfg = mixtral_cfg()
    assert hf_architecture(cfg) == MIXTRAL
    assert available_targets(cfg) == [*LLAMA_NAMES, "gate", "w1", "w3", "w2", "gate_proj", "up_proj", "down_proj",
                                      "all-linear"]
    info = apply_lora(moe_model(cfg), targets="w1,w3", rank=2, alpha=4)
    assert set(info.modules) == experts(0, "fc") | experts(1, "fc") and info.targets == ["w1", "w3"]
    assert all(parts == ["gate", "up"] for parts in info.modules.values())
    # Llama's names say the same (what recipes write); our own names too, with or without "{}"
    for same in ("gate_proj,up_proj", "mlp.experts.{}.fc", "mlp.experts.fc.gate,mlp.experts.fc.up"):
        assert apply_lora(moe_model(cfg), targets=same, rank=2, alpha=4).modules == info.modules, same
    info = apply_lora(moe_model(cfg), targets="down_proj,gate", rank=2, alpha=4)  # the router: only by name
    assert set(info.modules) == experts(0, "proj") | experts(1, "proj") | {"blocks.0.mlp.router", "blocks.1.mlp.router"}
    assert info.targets == ["gate", "w2"] and info.modules["blocks.1.mlp.router"] == ["router"]


def test_all_linear_is_every_projection_of_every_expert_but_not_the_router():
    for cfg in (mixtral_cfg(), qwen3_moe_cfg()):
        m = moe_model(cfg)
        info = apply_lora(m, targets="all-linear", rank=2, alpha=4)
        want = {f"blocks.{i}.attn.{p}" for i in range(2) for p in ("qkv", "proj")}
        want |= {n for i in range(2) for t in ("fc", "proj") for n in experts(i, t)}
        assert set(info.modules) == want and not any("router" in n for n, _ in lora_modules(m))


def test_qwen3_moe_vocabulary():
    cfg = qwen3_moe_cfg()
    assert hf_architecture(cfg) == QWEN3_MOE
    assert available_targets(cfg) == [*LLAMA_NAMES, "gate", "gate_proj", "up_proj", "down_proj", "all-linear"]
    info = apply_lora(moe_model(cfg), targets=["q_proj", "up_proj", "gate"], rank=2, alpha=4)
    assert info.modules["blocks.0.attn.qkv"] == ["q"] and info.modules["blocks.0.mlp.experts.3.fc"] == ["up"]
    assert info.modules["blocks.0.mlp.router"] == ["router"] and info.targets == ["q_proj", "gate", "up_proj"]


def test_a_target_that_matches_nothing_names_the_valid_ones():
    for cfg, bad in ((mixtral_cfg(), "c_attn"), (qwen3_moe_cfg(), "w1"), (mixtral_cfg(), "mlp.fc")):
        m = moe_model(cfg)
        with pytest.raises(UserError) as e:
            apply_lora(m, targets=["q_proj", bad])
        msg = str(e.value)
        assert msg.startswith(f"LoRA target {bad!r} matches no module of this ") and "\n" not in msg
        assert ", ".join(available_targets(cfg)) in msg and "mlp.experts.{}.fc" in msg
        assert not has_lora(m)


# ---------------------------------------------------------------------------------------------------
# Adapter files
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, targets, modules", [
    (mixtral_cfg(), "q_proj,w1,w3,w2,gate",
     ["self_attn.q_proj", "block_sparse_moe.gate"] + [f"block_sparse_moe.experts.{e}.{w}" for e in range(E)
                                                       for w in ("w1", "w3", "w2")]),
    (qwen3_moe_cfg(), "v_proj,all-linear,gate",
     [f"self_attn.{p}_proj" for p in "qkvo"] + ["mlp.gate"] + [f"mlp.experts.{e}.{w}_proj" for e in range(E)
                                                              for w in ("gate", "up", "down")]),
], ids=["mixtral", "qwen3-moe"])
def test_saved_names_are_the_names_peft_writes_per_expert(cfg, targets, modules, tmp_path):
    from safetensors.torch import load_file

    m = moe_model(cfg)
    apply_lora(m, targets=targets, rank=4, alpha=8)
    randomize_lora(m)
    save_adapter(m, tmp_path)
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert set(tensors) == {f"base_model.model.model.layers.{i}.{mod}.lora_{ab}.weight"
                            for i in range(2) for mod in modules for ab in "AB"}
    conf = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert conf["r"] == 4 and not conf["rank_pattern"] and not conf["alpha_pattern"] and conf["fan_in_fan_out"] is False
    # each expert its own adapter; gate and up of one expert share their A (saved with each)
    w = "block_sparse_moe.experts.{}.w1" if family_is_mixtral(cfg) else "mlp.experts.{}.gate_proj"
    key = "base_model.model.model.layers.1." + w + ".lora_A.weight"
    assert torch.equal(tensors[key.format(2)], m.blocks[1].mlp.experts[2].fc.lora_A.detach())
    assert not torch.equal(tensors[key.format(2)], tensors[key.format(3)])
    assert tensors[key.format(0).replace("lora_A", "lora_B")].shape == (cfg.d_ff, 4)

    fresh = moe_model(cfg)
    info = load_adapter(fresh, tmp_path)
    assert set(info.modules) == {n for n, _ in lora_modules(m)} and info.targets == conf["target_modules"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids()), m(ids()), atol=0, rtol=0)


def family_is_mixtral(cfg: ModelConfig) -> bool:
    return hf_architecture(cfg) == MIXTRAL


def test_an_adapter_for_more_experts_is_refused(tmp_path):
    m = moe_model(moe_cfg(n_experts=6))
    apply_lora(m, targets="w2", rank=2, alpha=4)
    save_adapter(m, tmp_path)
    with pytest.raises(UserError, match=r"layers.0.block_sparse_moe.experts.4.w2 is for expert 4, but this model has 4 "
                                        r"experts per layer"):
        load_adapter(moe_model(), tmp_path, check_base=False)
    with pytest.raises(UserError, match="made for a different base model .config differs: n_experts: 6"):
        load_adapter(moe_model(), tmp_path)


# ---------------------------------------------------------------------------------------------------
# peft on transformers (5: fused experts) both ways
# ---------------------------------------------------------------------------------------------------
def _hf_pair(cfg: ModelConfig, tmp_path: Path):
    """Our model and the same weights as a transformers model (exported with write_model_files)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from lmforge.loaders.model_dir import write_model_files

    transformers.logging.set_verbosity_error()
    ours = moe_model(cfg)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    write_model_files(hf_dir, ours)

    def load_hf():
        return transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()

    return ours, load_hf


def _peft_load(load_hf, directory: Path):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that it ignores our "lmforge" key
        return peft.PeftModel.from_pretrained(load_hf(), directory).eval()


@pytest.mark.parametrize("cfg, targets", [
    (mixtral_cfg(), "all-linear"),
    (mixtral_cfg(), "v_proj,w1,w3,w2,gate"),
    (qwen3_moe_cfg(), "all-linear"),
    (qwen3_moe_cfg(), "down_proj,gate"),
], ids=["mixtral-all", "mixtral-router", "qwen3-moe-all", "qwen3-moe-down-router"])
def test_our_adapter_loads_in_peft(cfg, targets, tmp_path):
    ours, load_hf = _hf_pair(cfg, tmp_path)
    apply_lora(ours, targets=targets, rank=4, alpha=8)
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = _peft_load(load_hf, tmp_path / "adapter")
    idx = ids()
    with torch.no_grad():
        want = ours(idx)
        assert not torch.allclose(want, load_hf()(idx).logits, atol=1e-3)  # the adapter does something
        torch.testing.assert_close(theirs(idx).logits, want, atol=1e-4, rtol=1e-4)
        merged = theirs.merge_and_unload()
        merge_lora(ours)
        torch.testing.assert_close(ours(idx), merged(idx).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg, target_modules", [
    (mixtral_cfg(), ["q_proj", "o_proj", "w1", "w3", "w2", "gate"]),
    (mixtral_cfg(), ["w2"]),
    (qwen3_moe_cfg(), "all-linear"),
], ids=["mixtral", "mixtral-down-only", "qwen3-moe-all"])
def test_peft_fused_adapter_loads_into_ours(cfg, target_modules, tmp_path):
    import_peft = pytest.importorskip("peft")
    ours, load_hf = _hf_pair(cfg, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = import_peft.get_peft_model(load_hf(), import_peft.LoraConfig(
            r=2, lora_alpha=6, init_lora_weights=False, target_modules=target_modules)).eval()
        theirs.save_pretrained(tmp_path / "peft")
    conf = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    assert conf["target_parameters"]  # the fused layout (transformers 5)
    info = load_adapter(ours, tmp_path / "peft")
    assert any(".experts." in n for n in info.modules)
    idx = ids()
    with torch.no_grad():
        want = theirs(idx).logits
        torch.testing.assert_close(ours(idx), want, atol=1e-4, rtol=1e-4)
    # Saved back per expert, and read by peft again: the same model.
    save_adapter(ours, tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(_peft_load(load_hf, tmp_path / "again")(idx).logits, want, atol=1e-4, rtol=1e-4)


def test_separate_gate_and_up_adapters_as_peft_on_transformers_4_wrote_them(tmp_path):
    """peft on transformers 4 gave every expert's w1 and w3 their own A: we stack them (rank 2r, B block-diagonal),
    compute what peft computes, and save the same tensors back."""
    from safetensors.torch import load_file, save_file

    ours, load_hf = _hf_pair(mixtral_cfg(), tmp_path)
    made = moe_model()  # the same base weights as `ours`
    apply_lora(made, targets="w1,w3,w2", rank=2, alpha=4)
    randomize_lora(made)
    save_adapter(made, tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS)
    g = torch.Generator().manual_seed(3)
    for key in tensors:
        if key.endswith("w3.lora_A.weight"):
            tensors[key] = torch.randn(tensors[key].shape, generator=g) * 0.2
    (tmp_path / "v4").mkdir()
    save_file(tensors, tmp_path / "v4" / ADAPTER_WEIGHTS)
    (tmp_path / "v4" / ADAPTER_CONFIG).write_text((tmp_path / "ours" / ADAPTER_CONFIG).read_text())

    load_adapter(ours, tmp_path / "v4")
    assert ours.blocks[0].mlp.experts[1].fc.lora_A.shape == (4, 32)  # w1's A over w3's
    idx = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), _peft_load(load_hf, tmp_path / "v4")(idx).logits, atol=1e-4, rtol=1e-4)
    save_adapter(ours, tmp_path / "again")
    again = load_file(tmp_path / "again" / ADAPTER_WEIGHTS)
    assert set(again) == set(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)
