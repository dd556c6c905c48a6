"""LoRA adapters in PEFT's format and LoRA targets in PEFT's vocabulary (lmforge/loaders/peft.py): the names
of every family, adapter round trips, refusals, PEFT compatibility in both directions (that group needs
`peft` and `transformers`, and is skipped without them), and the check that the names an adapter is saved
under are always modules of the model directory `state_dict_to_hf` writes for the same config."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.loaders.hf import config_to_hf
from lmforge.loaders.hf_tensors import family, state_dict_to_hf
from lmforge.loaders.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    apply_lora,
    available_targets,
    load_adapter,
    save_adapter,
)
from lmforge.model.lora import has_lora, lora_modules, merge_lora
from tests.model.test_lora import gpt2_cfg, ids, llama_cfg, model, randomize_lora
from tests.model.test_lora_moe import moe_cfg

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------------
# Target names
# ---------------------------------------------------------------------------------------------------
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
                            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, all-linear "
                            "(or our names: attn.qkv, attn.proj, mlp.fc, mlp.proj)")
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


# ---------------------------------------------------------------------------------------------------
# One table of names: what an adapter is saved under is what the model directory holds
# ---------------------------------------------------------------------------------------------------
def native_cfg(**kw) -> ModelConfig:
    """RoPE with a GELU MLP: no transformers class computes it, so it is saved under our own names."""
    return ModelConfig(vocab_size=128, context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                       norm="layernorm", mlp="gelu", positions="rope", **kw)


# Presets and their neighbours: Llama-shaped (with and without biases), Qwen2-shaped (q/k/v biases),
# GPT-2-shaped, and shapes of our own that a family-by-MLP rule used to name as Llama or GPT-2 modules.
FAMILY_CONFIGS = {
    "llama": (llama_cfg(), "LlamaForCausalLM"),
    "llama-biases": (llama_cfg(attention_bias=True, mlp_bias=True), "LlamaForCausalLM"),
    "qwen2": (llama_cfg(qkv_bias=True), "Qwen2ForCausalLM"),
    "qwen3": (llama_cfg(qk_norm=True), "Qwen3ForCausalLM"),
    "mistral": (llama_cfg(sliding_window=8), "MistralForCausalLM"),
    "gpt2": (gpt2_cfg(), "GPT2LMHeadModel"),
    "native-rope-gelu": (native_cfg(), "LmforgeForCausalLM"),
    "native-sinusoidal-swiglu": (llama_cfg(positions="sinusoidal"), "LmforgeForCausalLM"),
    "native-gelu-gqa": (gpt2_cfg(n_kv_heads=2), "LmforgeForCausalLM"),
    # Mixtures of experts: every expert's projections, and the router (tests/loaders/test_peft_moe.py).
    "mixtral": (moe_cfg(), "MixtralForCausalLM"),
    "qwen3-moe": (moe_cfg(qk_norm=True), "Qwen3MoeForCausalLM"),
    "native-moe": (moe_cfg(positions="sinusoidal"), "LmforgeForCausalLM"),
}


def _peft_matches(module: str, targets: list[str]) -> bool:
    """PEFT's rule (peft.tuners.tuners_utils.check_target_module_exists): a target is the whole module name
    or a suffix of it, starting at a name component."""
    return any(module == t or module.endswith("." + t) for t in targets)


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_adapter_names_are_modules_of_the_model_directory(name, tmp_path):
    from safetensors.torch import load_file

    cfg, arch = FAMILY_CONFIGS[name]
    assert config_to_hf(cfg)["architectures"] == [arch]
    base = model(cfg)
    # Every module of the model directory with a weight matrix, as transformers (or we) name it there.
    linear = {k.removesuffix(".weight") for k, v in state_dict_to_hf(cfg, base.state_dict()).items()
              if k.endswith(".weight") and v.dim() == 2}
    for target in available_targets(cfg):
        m = model(cfg)
        apply_lora(m, targets=[target], rank=2, alpha=4)
        out = save_adapter(m, tmp_path / target)
        saved = {re.sub(r"\.lora_[AB]\.weight$", "", k.removeprefix(PEFT_PREFIX)) for k in load_file(out / ADAPTER_WEIGHTS)}
        assert saved <= linear, (target, sorted(saved - linear))
        # ... and exactly the modules PEFT would wrap for the target_modules written beside them.
        conf = json.loads((out / ADAPTER_CONFIG).read_text())
        assert {mod for mod in linear if _peft_matches(mod, conf["target_modules"])} == saved, target
        assert conf["fan_in_fan_out"] is (family(cfg) == "gpt2")
        fresh = model(cfg)
        load_adapter(fresh, out)
        assert {n for n, _ in lora_modules(fresh)} == {n for n, _ in lora_modules(m)}


def test_native_models_name_targets_and_tensors_as_their_model_directory(tmp_path):
    from safetensors.torch import load_file

    cfg = native_cfg()
    assert available_targets(cfg) == ["qkv", "proj", "attn.proj", "mlp.proj", "fc", "q_proj", "k_proj", "v_proj",
                                      "o_proj", "up_proj", "down_proj", "all-linear"]
    m = model(cfg)
    info = apply_lora(m, targets="v_proj,mlp.proj", rank=2, alpha=4)
    assert info.modules["blocks.0.attn.qkv"] == ["v"] and info.targets == ["qkv", "mlp.proj"]
    randomize_lora(m)
    save_adapter(m, tmp_path)
    assert sorted(load_file(tmp_path / ADAPTER_WEIGHTS))[:2] == ["base_model.model.blocks.0.attn.qkv.lora_A.weight",
                                                                 "base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    fresh = model(cfg)
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids()), m(ids()), atol=0, rtol=0)
    with pytest.raises(UserError, match="matches no module of this lmforge-native \\(GELU\\) model"):
        apply_lora(model(cfg), targets="c_attn")  # GPT-2's names are GPT-2's
    llama_named = tmp_path / "llama"
    other = model(llama_cfg(positions="sinusoidal"))
    apply_lora(other, targets="q_proj", rank=2, alpha=4)
    save_adapter(other, llama_named)
    with pytest.raises(UserError, match="'base_model.model.blocks.0.attn.qkv.lora_A.weight' is not a LoRA weight "
                                        "of a Llama-style model's projections"):
        load_adapter(model(llama_cfg()), llama_named, check_base=False)


@pytest.mark.parametrize("name", ["llama-biases", "qwen2", "qwen3", "mistral", "gpt2"])
def test_our_adapter_loads_in_peft_for_every_family(name, tmp_path):
    cfg, arch = FAMILY_CONFIGS[name]
    test_our_adapter_loads_in_peft(cfg, "all-linear", arch, tmp_path)
