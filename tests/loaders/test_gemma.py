"""Gemma 2 and Gemma 3 (text, and the language model of a multimodal Gemma 3 checkpoint), end to end, proved
against `transformers` on tiny random models built from their configs (no downloads).

What each one exercises: (1 + w) RMSNorms before and after both sublayers, embeddings scaled by sqrt(d_model),
GeGLU, a query scale from query_pre_attn_scalar (here unlike 1/sqrt(head_dim)), alternating sliding-window
and global layers at a length well past the window; Gemma 2's soft-capped attention scores and logits;
Gemma 3's q/k norms, local RoPE base and linearly scaled global RoPE. Each gives transformers' logits (fp32,
1e-4), cached decoding equal to full recomputation, and the same 16 greedy tokens through our Engine
(`tests.loaders.parity`), on import and after our export, which transformers loads back.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.errors import UserError  # noqa: E402
from lmforge.loaders.hf import GEMMA2, GEMMA3, hf_architecture  # noqa: E402
from lmforge.loaders.hf_read import config_from_hf  # noqa: E402
from lmforge.loaders.model_dir import load_model, write_model_files  # noqa: E402
from tests.loaders.parity import assert_adapter_matches_peft, assert_matches_transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

WINDOW = 8  # the parity check runs 24 tokens and generates 16 more: three windows and more
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, sliding_window=WINDOW,
            query_pre_attn_scalar=24, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA2_KW = dict(attn_logit_softcapping=4.0, final_logit_softcapping=3.0)  # small caps, so that they bite
GEMMA3_KW = dict(sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=10000.0,
                 rope_scaling={"rope_type": "linear", "factor": 2.0})


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (norm weights too, around 0 since Gemma applies 1 + w). The embedding is kept
    small: scaled by sqrt(d_model) and tied to the output head, a large one makes every token predict itself,
    and greedy decoding that repeats one token is a comparison that cannot fail."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if p.dim() == 1 else 0.02 if "embed" in name else 0.15)
    return model.eval()


def hf_gemma(kind: str, vocab: int) -> torch.nn.Module:
    if kind == "gemma2":
        conf = transformers.Gemma2Config(vocab_size=vocab, **BASE, **GEMMA2_KW)
    elif kind == "gemma3":
        conf = transformers.Gemma3TextConfig(vocab_size=vocab, **BASE, **GEMMA3_KW)
    else:  # the multimodal checkpoint, with a vision tower as small as it gets
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        conf = transformers.Gemma3Config(text_config=dict(vocab_size=vocab, **BASE, **GEMMA3_KW), vision_config=vision,
                                         mm_tokens_per_image=4, image_token_index=vocab - 1, boi_token_index=vocab - 2,
                                         eoi_token_index=vocab - 3)
        return randomize(transformers.Gemma3ForConditionalGeneration(conf))
    return randomize(transformers.AutoModelForCausalLM.from_config(conf))


class TextOnly(torch.nn.Module):
    """A multimodal Gemma 3 called with token ids only: the logits of its language model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.generation_config = model, model.generation_config

    def forward(self, idx):
        return self.model(input_ids=idx)

    def generate(self, *a, **kw):
        return self.model.generate(*a, **kw)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "gemma3-multimodal"])
def test_import_and_export_match_transformers(kind, tmp_path, tiny_tokenizer):
    ref = hf_gemma(kind, tiny_tokenizer.vocab_size)
    ref.save_pretrained(tmp_path / "theirs")
    ours = load_model(tmp_path / "theirs")
    cfg = ours.config
    assert (cfg.sliding_window, cfg.context_length, cfg.norm_offset, cfg.post_norms, cfg.embed_scale, cfg.mlp) == \
           (WINDOW, 64, True, True, True, "geglu")
    assert cfg.attn_scale == pytest.approx(24 ** -0.5)
    if kind == "gemma2":
        assert cfg.sliding_layers == [0, 2] and (cfg.attn_softcap, cfg.final_softcap) == (4.0, 3.0)
        assert not cfg.qk_norm and cfg.rope_local_theta is None
    else:
        assert cfg.sliding_layers == [0, 1, 3] and cfg.qk_norm and cfg.rope_local_theta == 10000.0
        assert cfg.rope_theta == 1e6 and cfg.rope_scaling == {"type": "linear", "factor": 2.0}
    ref_text = TextOnly(ref) if kind == "gemma3-multimodal" else ref
    assert_matches_transformers(ref_text, ours, tiny_tokenizer)

    # Exported (as the text-only class), loaded by transformers and by us
    (tmp_path / "ours").mkdir()
    write_model_files(tmp_path / "ours", ours, tokenizer=tiny_tokenizer)
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == [GEMMA2 if kind == "gemma2" else GEMMA3]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert_matches_transformers(theirs, load_model(tmp_path / "ours"), tiny_tokenizer)


def test_config_both_ways(tiny_tokenizer):
    """Our config -> config.json -> our config is the identity, and transformers reads the same model."""
    for kind in ("gemma2", "gemma3"):
        ref = hf_gemma(kind, tiny_tokenizer.vocab_size)
        cfg = config_from_hf(ref.config.to_dict())
        from lmforge.loaders.hf import config_to_hf
        again = config_from_hf(json.loads(json.dumps(config_to_hf(cfg))))
        assert again == cfg and hf_architecture(cfg) == (GEMMA2 if kind == "gemma2" else GEMMA3)


def test_transformers_4_spelling_of_gemma3_rope():
    """Files written by transformers 4.x keep rope_theta / rope_local_base_freq / rope_scaling at the top."""
    d = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 64, **BASE,
         "rope_theta": 1e6, "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    cfg = config_from_hf(d)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling) == (1e6, 10000.0, {"type": "linear", "factor": 8.0})
    assert cfg.sliding_layers is None and cfg.final_softcap is None  # pattern 6 by default: all 4 layers slide


@pytest.mark.parametrize("edits, message", [
    ({"hidden_activation": "relu"}, "hidden_activation 'relu' is not supported"),
    ({"layer_types": ["sliding_attention"]}, "layer_types must list"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"query_pre_attn_scalar": -1}, "query_pre_attn_scalar must be a positive number"),
])
def test_bad_configs_are_one_line(edits, message):
    d = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 64, **BASE, **edits}
    with pytest.raises(UserError, match=message):
        config_from_hf(d, source="cfg.json")


def test_sliding_window_beyond_the_context_keeps_full_attention_everywhere(tmp_path, tiny_tokenizer):
    """A window at least as long as what is attended over changes nothing: the sliding layers run exactly as
    the global ones (no mask is built)."""
    ref = hf_gemma("gemma2", tiny_tokenizer.vocab_size)
    ref.config.sliding_window = 4096
    for layer in ref.model.layers:
        if layer.self_attn.sliding_window:
            layer.self_attn.sliding_window = 4096
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.sliding_window == 4096
    idx = torch.randint(0, tiny_tokenizer.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind, targets", [("gemma2", "all-linear"), ("gemma3", "q_proj,v_proj,gate_proj,down_proj")])
def test_lora_adapter_loads_in_peft(kind, targets, tmp_path, tiny_tokenizer):
    """LoRA on Gemma under PEFT's names: peft puts our adapter on transformers' Gemma and computes our logits,
    adapted and merged."""
    hf_gemma(kind, tiny_tokenizer.vocab_size).save_pretrained(tmp_path / "base")
    assert_adapter_matches_peft(tmp_path / "base", targets, tmp_path)


def test_cli_import_show_list_generate(tmp_path, capsys, tiny_tokenizer):
    """What a user does with a downloaded Gemma: import it (a multimodal checkpoint too), see its family,
    run it."""
    from conftest import run_cli

    ref = hf_gemma("gemma3-multimodal", tiny_tokenizer.vocab_size)
    ref.save_pretrained(tmp_path / "g3")
    tiny_tokenizer.save(tmp_path / "g3")
    code, out, err = run_cli(capsys, "import", tmp_path / "g3", "--name", "g3")
    assert code == 0 and "g3:latest" in out, err
    code, out, _ = run_cli(capsys, "show", "g3")
    assert code == 0 and "Gemma3ForConditionalGeneration" in out  # what the files are (we run their text model)
    code, out, _ = run_cli(capsys, "list")
    name, family = out.splitlines()[1].split()[:2]
    assert name == "g3:latest" and family.startswith("Gemma3")
    code, out, err = run_cli(capsys, "generate", "g3", "--prompt", "the model", "--temperature", "0",
                             "--max-new-tokens", "8", "--no-fast")
    assert code == 0 and out.strip(), err
