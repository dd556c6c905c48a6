"""Mixtral (a sparse mixture of SwiGLU experts), imported and exported, proved against `transformers` on tiny
random models built from `MixtralConfig` (4 experts, top-2; no downloads, no sliding window within the test
lengths).

Each path gives transformers' logits (fp32, 1e-4), the same experts chosen for every token in every layer
(read from transformers' own router by a hook), the same 16 greedy tokens through our `Engine`, and cached
decoding equal to full recomputation: the directory as transformers saves it, and our export of it (which
transformers loads back as `MixtralForCausalLM`, and we load back unchanged). Also: config.json both ways,
16-bit files kept in their stored bytes. (GGUF both ways: tests/loaders/gguf/test_gguf_moe.py.)
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.loaders.auto import load  # noqa: E402
from lmforge.loaders.hf import MIXTRAL, NATIVE, config_to_hf, hf_architecture  # noqa: E402
from lmforge.loaders.hf_read import config_from_hf  # noqa: E402
from lmforge.loaders.model_dir import load_model, write_model_files  # noqa: E402
from lmforge.model.gpt import GPT  # noqa: E402
from tests.loaders.parity import assert_moe_matches_transformers  # noqa: E402
from lmforge.quant.linear import GGMLLinear  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5)


def hf_mixtral(vocab: int, **overrides) -> torch.nn.Module:
    """A seeded MixtralForCausalLM with every parameter random (norm weights and the router too), wide enough
    that greedy decoding does not settle on one token and tokens spread over the experts."""
    torch.manual_seed(0)
    conf = transformers.MixtralConfig(vocab_size=vocab, **{**BASE, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
            elif "gate.weight" in name:
                p.normal_(0.0, 0.5)  # a decisive router: top-2 choices far from ties
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture
def mixtral_dir(tmp_path, tiny_tokenizer):
    """(transformers model, its saved directory with our tokenizer beside it)."""
    ref = hf_mixtral(tiny_tokenizer.vocab_size)
    d = tmp_path / "mixtral-hf"
    ref.save_pretrained(d)
    tiny_tokenizer.save(d)
    return ref, d


# ---------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------
def test_config_both_ways():
    d = {**transformers.MixtralConfig(vocab_size=128, **BASE).to_dict(), "architectures": [MIXTRAL]}
    cfg = config_from_hf(d)
    assert (cfg.n_experts, cfg.experts_per_token, cfg.norm_topk_prob, cfg.d_ff) == (4, 2, True, 96)
    assert (cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings, cfg.context_length) == (2, 1e6, False, 64)
    assert hf_architecture(cfg) == MIXTRAL
    written = config_to_hf(cfg)
    assert written["architectures"] == [MIXTRAL] and written["model_type"] == "mixtral"
    assert (written["num_local_experts"], written["num_experts_per_tok"]) == (4, 2)
    assert config_from_hf(written) == cfg
    # A sparse file means what it means to transformers: 8 experts, top-2, theta 1e6, kv heads = heads.
    sparse = {k: d[k] for k in ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads")}
    cfg = config_from_hf(sparse)
    assert (cfg.n_experts, cfg.experts_per_token, cfg.rope_theta, cfg.n_kv_heads) == (8, 2, 1e6, 4)
    # Mixtral slides in every layer when sliding_window is set, as Mistral does
    slides = config_from_hf({**d, "sliding_window": 16})
    assert (slides.sliding_window, slides.sliding_layers, slides.context_length) == (16, None, d["max_position_embeddings"])


@pytest.mark.parametrize("edits, message", [
    ({"num_experts_per_tok": 5}, "experts_per_token must be between 1 and n_experts (4), got 5"),
    ({"num_local_experts": 0}, "num_local_experts must be a positive integer, got 0"),
    ({"num_experts_per_tok": "2"}, "num_experts_per_tok must be a positive integer, got '2'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_bad_configs_are_one_line(edits, message):
    d = {**transformers.MixtralConfig(vocab_size=128, **BASE).to_dict(), "architectures": [MIXTRAL], **edits}
    with pytest.raises(UserError) as e:
        config_from_hf(d, source="cfg.json")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_shapes_transformers_cannot_run_stay_ours():
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=1, n_heads=4, d_ff=96, n_experts=4, norm_topk_prob=False)
    assert hf_architecture(cfg) == NATIVE  # Mixtral always renormalises over the chosen experts
    assert hf_architecture(cfg.replace(norm_topk_prob=True, mlp_bias=True)) == NATIVE
    assert hf_architecture(cfg.replace(norm_topk_prob=True)) == MIXTRAL


# ---------------------------------------------------------------------------------------------------
# Import, export, and back
# ---------------------------------------------------------------------------------------------------
def test_import_matches_transformers(mixtral_dir, tiny_tokenizer):
    ref, d = mixtral_dir
    ours = load_model(d)
    assert (ours.config.n_experts, ours.config.experts_per_token, ours.config.name) == (4, 2, "mixtral")
    assert_moe_matches_transformers(ref, ours, tiny_tokenizer)


def test_export_loads_in_transformers_and_back(mixtral_dir, tmp_path, tiny_tokenizer):
    ref, d = mixtral_dir
    ours = load(d).model
    (tmp_path / "out").mkdir()
    write_model_files(tmp_path / "out", ours, tokenizer=tiny_tokenizer)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == [MIXTRAL]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(theirs).__name__ == MIXTRAL
    assert_moe_matches_transformers(theirs, ours, tiny_tokenizer)
    back = load_model(tmp_path / "out")
    assert back.config == ours.config
    for (n, p), (_, q) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), n


def test_trained_here_exports_as_mixtral(tmp_path, tiny_tokenizer):
    """A mixture of experts built here (not imported) exports as Mixtral, and transformers computes the same."""
    cfg = ModelConfig(vocab_size=tiny_tokenizer.vocab_size, context_length=64, d_model=64, n_layers=2, n_heads=4,
                      n_kv_heads=2, d_ff=96, n_experts=4, experts_per_token=2, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    write_model_files(tmp_path, model, tokenizer=tiny_tokenizer)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=1e-4, rtol=1e-4)
    assert load_model(tmp_path).config == cfg


def test_config_naming_another_expert_count_is_refused(mixtral_dir):
    _, d = mixtral_dir
    conf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**conf, "num_local_experts": 2}))  # the file holds 4
    with pytest.raises(UserError, match=r"block_sparse_moe.gate.weight' \(layer 0's router: experts x hidden size\) "
                                        r"has shape \(4, 64\), but config.json implies \(2, 64\)"):
        load_model(d)


def test_sixteen_bit_file_keeps_its_bytes(tmp_path, tiny_tokenizer):
    """dtype="auto" (what the CLI and server load with) keeps a bf16 file's matrices packed, experts and the
    router included, and computes what the same rounded weights compute in float32."""
    ref = hf_mixtral(tiny_tokenizer.vocab_size).to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    packed = load_model(tmp_path, dtype="auto")
    assert isinstance(packed.blocks[0].mlp.experts[3].fc, GGMLLinear)
    assert isinstance(packed.blocks[1].mlp.router, GGMLLinear)
    # 2 x 8 = 16 rows: below the row count at which an AMX machine's kernels round activations to bf16 for
    # its GEMM tiles (quant.kernels.tile_dtype), so every CPU computes the fp32 product of the rounded weights.
    idx = torch.randint(0, tiny_tokenizer.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(packed(idx), load_model(tmp_path)(idx), atol=1e-4, rtol=1e-4)


def test_a_sliding_window_matches_transformers_on_import_and_export(tmp_path, tiny_tokenizer):
    """Mixtral with an 8-token window in every layer (MixtralConfig.sliding_window), at 24 tokens and 16 more
    generated: transformers' logits, experts and greedy tokens, on import and after export."""
    ref = hf_mixtral(tiny_tokenizer.vocab_size, sliding_window=8)
    ref.save_pretrained(tmp_path / "theirs")
    ours = load_model(tmp_path / "theirs")
    assert (ours.config.sliding_window, ours.config.sliding_layers) == (8, None)
    assert_moe_matches_transformers(ref, ours, tiny_tokenizer)
    (tmp_path / "ours").mkdir()
    write_model_files(tmp_path / "ours", ours, tokenizer=tiny_tokenizer)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert theirs.config.sliding_window == 8
    assert_moe_matches_transformers(theirs, load_model(tmp_path / "ours"), tiny_tokenizer)
