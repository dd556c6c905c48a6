"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases), a sparse mixture of SwiGLU
experts in every layer, and a shared expert that every token runs through, scaled by a sigmoid gate of its own.
Proved against `transformers` on tiny random models built from `Qwen2MoeConfig` (no downloads): logits (fp32,
1e-4), the same experts per token, the same 16 greedy tokens, cached decoding equal to full recomputation; on
import and after our export, which transformers loads back as `Qwen2MoeForCausalLM`. A model trained here with
a shared expert exports as Qwen2-MoE."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.loaders.hf import QWEN2_MOE, config_to_hf, hf_architecture  # noqa: E402
from lmforge.loaders.hf_read import config_from_hf  # noqa: E402
from lmforge.loaders.model_dir import load_model, write_model_files  # noqa: E402
from lmforge.model.gpt import GPT  # noqa: E402
from tests.loaders.parity import assert_adapter_matches_peft, assert_moe_matches_transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

BASE = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=80,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_experts=4,
            num_experts_per_tok=2, rms_norm_eps=1e-6, tie_word_embeddings=False)


def hf_qwen2_moe(vocab: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2MoeConfig(vocab_size=vocab, **{**BASE, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)  # a decisive router: top-2 choices far from ties
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


@pytest.mark.parametrize("overrides", [dict(norm_topk_prob=False), dict(norm_topk_prob=True, qkv_bias=False)],
                         ids=["qwen1.5-moe", "renormalised-no-bias"])
def test_import_and_export_match_transformers(overrides, tmp_path, tiny_tokenizer):
    ref = hf_qwen2_moe(tiny_tokenizer.vocab_size, **overrides)
    ref.save_pretrained(tmp_path / "theirs")
    ours = load_model(tmp_path / "theirs")
    cfg = ours.config
    assert (cfg.n_experts, cfg.experts_per_token, cfg.d_ff, cfg.shared_expert_d_ff) == (4, 2, 48, 80)
    assert (cfg.norm_topk_prob, cfg.qkv_bias) == (ref.config.norm_topk_prob, ref.config.qkv_bias)
    assert_moe_matches_transformers(ref, ours, tiny_tokenizer)
    (tmp_path / "ours").mkdir()
    write_model_files(tmp_path / "ours", ours, tokenizer=tiny_tokenizer)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == [QWEN2_MOE]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    back = load_model(tmp_path / "ours")
    assert back.config == cfg
    assert_moe_matches_transformers(theirs, back, tiny_tokenizer)


def test_trained_here_with_a_shared_expert_exports_as_qwen2_moe(tmp_path, tiny_tokenizer):
    cfg = ModelConfig(vocab_size=tiny_tokenizer.vocab_size, context_length=64, d_model=64, n_layers=2, n_heads=4,
                      n_kv_heads=2, d_ff=48, n_experts=4, experts_per_token=2, shared_expert_d_ff=32, qkv_bias=True)
    assert hf_architecture(cfg) == QWEN2_MOE and config_from_hf(config_to_hf(cfg)) == cfg
    assert cfg.num_params() == GPT(cfg).num_params()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    write_model_files(tmp_path, model, tokenizer=tiny_tokenizer)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("edits, message", [
    ({"mlp_only_layers": [1]}, "mlp_only_layers"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step 2"),
])
def test_what_we_do_not_compute_is_one_line(edits, message):
    d = {**transformers.Qwen2MoeConfig(vocab_size=128, **BASE).to_dict(), "architectures": [QWEN2_MOE], **edits}
    with pytest.raises(UserError, match=message):
        config_from_hf(d, source="cfg.json")
    with pytest.raises(UserError, match="a shared expert needs routed experts"):
        ModelConfig(shared_expert_d_ff=8)


def test_lora_adapter_loads_in_peft(tmp_path, tiny_tokenizer):
    """LoRA on attention and the shared expert, under PEFT's names: peft puts our adapter on transformers'
    Qwen2-MoE and computes our logits. (Per-expert adapters are not checked through peft here: on transformers
    5, peft converts them to its fused expert parameters only for model types transformers' conversion table
    maps, which lists qwen3_moe -> qwen2_moe but not qwen2_moe itself, so it loads none for Qwen2-MoE; our own
    save and load of them is checked below.)"""
    hf_qwen2_moe(tiny_tokenizer.vocab_size).save_pretrained(tmp_path / "base")
    modules = assert_adapter_matches_peft(tmp_path / "base", "q_proj,mlp.shared_expert.gate_proj,mlp.shared_expert.down_proj",
                                          tmp_path)
    assert "blocks.0.mlp.shared.fc" in modules


def test_all_linear_adapts_every_expert_and_the_shared_one(tmp_path, tiny_tokenizer):
    from lmforge.loaders.peft import apply_lora, load_adapter, save_adapter
    from lmforge.model.lora import merge_lora
    from tests.model.test_lora import randomize_lora

    hf_qwen2_moe(tiny_tokenizer.vocab_size).save_pretrained(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    info = apply_lora(ours, targets="all-linear", rank=4, alpha=8)
    assert {"blocks.1.mlp.shared.fc", "blocks.1.mlp.shared.proj", "blocks.1.mlp.experts.3.fc"} <= set(info.modules)
    assert not any("router" in m or "shared_gate" in m for m in info.modules)
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    again = load_model(tmp_path / "base")
    load_adapter(again, tmp_path / "adapter")
    idx = torch.randint(0, tiny_tokenizer.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ours(idx)
        torch.testing.assert_close(again(idx), want)
        torch.testing.assert_close(merge_lora(again)(idx), want, atol=1e-5, rtol=1e-5)


def test_windows_without_layer_types_follow_qwen2_moes_own_rule():
    """Qwen2MoeConfig slides every other layer below max_window_layers (dense Qwen2: the layers from it on)."""
    d = transformers.Qwen2MoeConfig(vocab_size=128, **{**BASE, "num_hidden_layers": 6}, use_sliding_window=True,
                                    sliding_window=8, max_window_layers=4).to_dict()
    want = [i for i, t in enumerate(d.pop("layer_types")) if t == "sliding_attention"]
    assert want == [0, 2]
    assert config_from_hf({**d, "architectures": [QWEN2_MOE]}).sliding_layers == want
