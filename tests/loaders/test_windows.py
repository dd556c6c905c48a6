"""Sliding windows of the Llama-descended families imported as real windows (no longer a capped context),
proved against transformers past the window: Mistral (every layer), Qwen2 (where layer_types / max_window_layers
say, and only with use_sliding_window), and the spellings transformers accepts for them. (Gemma's local/global
layers: test_gemma.py; Phi-3's: test_phi3.py; Mixtral's: test_mixtral.py; the KV rings: engine/test_scheduler.py.)
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.loaders.hf_read import config_from_hf  # noqa: E402
from lmforge.loaders.model_dir import load_model, write_model_files  # noqa: E402
from tests.loaders.parity import assert_matches_transformers  # noqa: E402
from tests.loaders.test_hf import LLAMA, hf_model  # noqa: E402


def test_mistral_sliding_window_is_real(tmp_path, tiny_tokenizer):
    """Mistral attends through its window in every layer; prompts and generation three windows long match
    transformers, and the whole context stays usable (no longer capped at the window)."""
    ref = hf_model("mistral", sliding_window=8, vocab_size=tiny_tokenizer.vocab_size)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert (ours.config.context_length, ours.config.sliding_window, ours.config.sliding_layers) == (64, 8, None)
    assert_matches_transformers(ref, ours, tiny_tokenizer)
    conf = transformers.MistralConfig(**{**LLAMA, "sliding_window": None}).to_dict()
    assert config_from_hf({**conf, "architectures": ["MistralForCausalLM"]}).sliding_window is None
    (tmp_path / "out").mkdir()
    write_model_files(tmp_path / "out", ours, tokenizer=tiny_tokenizer)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(theirs).__name__ == "MistralForCausalLM"
    assert_matches_transformers(theirs, ours, tiny_tokenizer)


def test_qwen2_sliding_window_only_where_used(tmp_path, tiny_tokenizer):
    def window(**kw):
        d = transformers.Qwen2Config(**{**LLAMA, **kw}).to_dict()
        cfg = config_from_hf({**d, "architectures": ["Qwen2ForCausalLM"]})
        return cfg.sliding_window, cfg.sliding_layers

    assert window(sliding_window=16) == (None, None)  # use_sliding_window is false
    assert window(use_sliding_window=True, sliding_window=16, max_window_layers=1) == (16, [1])
    assert window(use_sliding_window=True, sliding_window=16, max_window_layers=2) == (None, None)  # no layer slides
    d = transformers.Qwen2Config(**LLAMA, use_sliding_window=True, sliding_window=16, max_window_layers=1).to_dict()
    d.pop("layer_types")  # older files: derived from max_window_layers
    assert config_from_hf({**d, "architectures": ["Qwen2ForCausalLM"]}).sliding_layers == [1]
    # one sliding layer of two, at a length past its window: transformers' logits, and back through export
    ref = hf_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1,
                   vocab_size=tiny_tokenizer.vocab_size, tie_word_embeddings=False)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert_matches_transformers(ref, ours, tiny_tokenizer)
    (tmp_path / "out").mkdir()
    write_model_files(tmp_path / "out", ours, tokenizer=tiny_tokenizer)
    assert load_model(tmp_path / "out").config == ours.config


def test_qwen2_window_spellings_transformers_accepts():
    """`sliding_window: null` means no window even with use_sliding_window; max_window_layers 0 makes every
    layer slide (files without layer_types)."""
    d = transformers.Qwen2Config(**LLAMA, use_sliding_window=True, sliding_window=None).to_dict()
    assert config_from_hf({**d, "architectures": ["Qwen2ForCausalLM"]}).sliding_window is None
    d = transformers.Qwen2Config(**LLAMA, use_sliding_window=True, sliding_window=16, max_window_layers=0).to_dict()
    d.pop("layer_types")
    cfg = config_from_hf({**d, "architectures": ["Qwen2ForCausalLM"]})
    assert (cfg.sliding_window, cfg.sliding_layers) == (16, None)
