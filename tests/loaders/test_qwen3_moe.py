"""Qwen3-MoE (Qwen3's attention with per-head q/k norms, a sparse mixture of SwiGLU experts in every layer),
imported and exported, proved against `transformers` on tiny random models built from `Qwen3MoeConfig`
(4 experts, top-2, expert width different from intermediate_size, head_dim != hidden_size / heads; routing
weights renormalised over the chosen experts and not; no downloads).

Each path gives transformers' logits (fp32, 1e-4), the same experts chosen for every token in every layer
(read from transformers' own router by a hook), the same 16 greedy tokens through our `Engine`, and cached
decoding equal to full recomputation: the directory as transformers saves it, and our export of it (which
transformers loads back as `Qwen3MoeForCausalLM`, and we load back unchanged). Also: config.json both ways,
what we do not compute (dense layers mixed in, shared experts) refused in one line. (GGUF both ways:
tests/loaders/gguf/test_gguf_moe.py.)
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.loaders.auto import load  # noqa: E402
from lmforge.loaders.hf import MIXTRAL, NATIVE, QWEN3_MOE, config_to_hf, hf_architecture  # noqa: E402
from lmforge.loaders.hf_read import config_from_hf  # noqa: E402
from lmforge.loaders.model_dir import load_model, write_model_files  # noqa: E402
from lmforge.model.gpt import GPT  # noqa: E402
from tests.loaders.parity import assert_moe_matches_transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

BASE = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
            rms_norm_eps=1e-6, tie_word_embeddings=False)


def hf_qwen3_moe(vocab: int, **overrides) -> torch.nn.Module:
    """A seeded Qwen3MoeForCausalLM with every parameter random (norm weights, q/k norms and the router too),
    wide enough that greedy decoding does not settle on one token and tokens spread over the experts."""
    torch.manual_seed(0)
    conf = transformers.Qwen3MoeConfig(vocab_size=vocab, **{**BASE, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
            elif "gate.weight" in name:
                p.normal_(0.0, 0.5)  # a decisive router: top-2 choices far from ties
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def hf_dict(**edits) -> dict:
    return {**transformers.Qwen3MoeConfig(vocab_size=128, **BASE).to_dict(), "architectures": [QWEN3_MOE], **edits}


@pytest.fixture(params=[True, False], ids=["renormalised", "not-renormalised"])
def qwen3_moe_dir(request, tmp_path, tiny_tokenizer):
    """(transformers model, its saved directory with our tokenizer beside it), norm_topk_prob both ways."""
    ref = hf_qwen3_moe(tiny_tokenizer.vocab_size, norm_topk_prob=request.param)
    d = tmp_path / "qwen3-moe-hf"
    ref.save_pretrained(d)
    tiny_tokenizer.save(d)
    return ref, d


# ---------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_config_both_ways(norm_topk_prob):
    cfg = config_from_hf(hf_dict(norm_topk_prob=norm_topk_prob))
    assert (cfg.n_experts, cfg.experts_per_token, cfg.norm_topk_prob, cfg.d_ff) == (4, 2, norm_topk_prob, 48)
    assert (cfg.qk_norm, cfg.head_dim, cfg.n_kv_heads, cfg.context_length) == (True, 24, 2, 64)
    assert not cfg.tie_embeddings
    assert hf_architecture(cfg) == QWEN3_MOE
    written = config_to_hf(cfg)
    assert written["architectures"] == [QWEN3_MOE] and written["model_type"] == "qwen3_moe"
    assert (written["num_experts"], written["num_experts_per_tok"], written["moe_intermediate_size"]) == (4, 2, 48)
    assert written["norm_topk_prob"] is norm_topk_prob and written["mlp_only_layers"] == []
    assert config_from_hf(written) == cfg
    # Qwen's own files say num_experts (transformers 5 writes num_local_experts): both are read.
    assert config_from_hf({k: v for k, v in written.items() if k != "num_local_experts"}) == cfg


def test_sparse_config_means_what_it_means_to_transformers():
    d = hf_dict()
    sparse = {k: d[k] for k in ("architectures", "vocab_size", "hidden_size", "num_hidden_layers",
                                "num_attention_heads")}
    cfg = config_from_hf(sparse)
    ref = transformers.Qwen3MoeConfig(**{k: v for k, v in sparse.items() if k != "architectures"})
    assert (cfg.n_experts, cfg.experts_per_token) == (ref.num_experts, ref.num_experts_per_tok)
    assert cfg.norm_topk_prob is ref.norm_topk_prob is False  # Qwen3MoeConfig's default (Qwen's files set true)
    assert (cfg.d_ff, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta) == (768, 4, 64 // 4, 10000.0)
    # use_sliding_window makes every layer slide (Qwen3MoeConfig); the context stays whole
    slides = config_from_hf({**d, "use_sliding_window": True, "sliding_window": 16})
    assert (slides.sliding_window, slides.sliding_layers, slides.context_length) == (16, None, 64)
    assert config_from_hf({**d, "use_sliding_window": False, "sliding_window": 16}).sliding_window is None


@pytest.mark.parametrize("edits, message", [
    ({"mlp_only_layers": [1]}, "mlp_only_layers [1] is not supported (dense layers mixed in"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step 2 is not supported (dense layers mixed in"),
    ({"shared_expert_intermediate_size": 64}, "shared experts (shared_expert_intermediate_size 64) are not supported"),
    ({"num_experts_per_tok": 5}, "experts_per_token must be between 1 and n_experts (4), got 5"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false, got 'yes'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_what_we_do_not_compute_is_one_line(edits, message):
    with pytest.raises(UserError) as e:
        config_from_hf(hf_dict(**edits), source="cfg.json")
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("cfg.json: ")


def test_qk_norm_tells_qwen3_moe_from_mixtral():
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=1, n_heads=4, d_ff=96, n_experts=4, qk_norm=True)
    assert hf_architecture(cfg) == QWEN3_MOE
    assert hf_architecture(cfg.replace(norm_topk_prob=False)) == QWEN3_MOE
    assert hf_architecture(cfg.replace(attention_bias=True)) == QWEN3_MOE
    assert hf_architecture(cfg.replace(qk_norm=False)) == MIXTRAL
    assert hf_architecture(cfg.replace(mlp_bias=True)) == NATIVE  # no transformers class has biased experts


# ---------------------------------------------------------------------------------------------------
# Import, export, and back
# ---------------------------------------------------------------------------------------------------
def test_import_matches_transformers(qwen3_moe_dir, tiny_tokenizer):
    ref, d = qwen3_moe_dir
    ours = load_model(d)
    cfg = ours.config
    assert (cfg.n_experts, cfg.experts_per_token, cfg.name) == (4, 2, "qwen3_moe")
    assert cfg.norm_topk_prob is ref.config.norm_topk_prob
    assert_moe_matches_transformers(ref, ours, tiny_tokenizer)


def test_export_loads_in_transformers_and_back(qwen3_moe_dir, tmp_path, tiny_tokenizer):
    ref, d = qwen3_moe_dir
    ours = load(d).model
    (tmp_path / "out").mkdir()
    write_model_files(tmp_path / "out", ours, tokenizer=tiny_tokenizer)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == [QWEN3_MOE]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(theirs).__name__ == QWEN3_MOE and theirs.config.norm_topk_prob is ref.config.norm_topk_prob
    assert_moe_matches_transformers(theirs, ours, tiny_tokenizer)
    back = load_model(tmp_path / "out")
    assert back.config == ours.config
    for (n, p), (_, q) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), n


def test_trained_here_exports_as_qwen3_moe(tmp_path, tiny_tokenizer):
    """A mixture of experts with q/k norms built here (not imported) exports as Qwen3-MoE, and transformers
    computes the same."""
    cfg = ModelConfig(vocab_size=tiny_tokenizer.vocab_size, context_length=64, d_model=64, n_layers=2, n_heads=4,
                      n_kv_heads=2, head_dim=24, d_ff=48, n_experts=4, experts_per_token=2, norm_topk_prob=False,
                      qk_norm=True, tie_embeddings=True)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    write_model_files(tmp_path, model, tokenizer=tiny_tokenizer)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(ref).__name__ == QWEN3_MOE
    idx = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=1e-4, rtol=1e-4)
    assert load_model(tmp_path).config == cfg
