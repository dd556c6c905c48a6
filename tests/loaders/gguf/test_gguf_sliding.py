"""Sliding windows in `llama` / `qwen2` / `qwen3` GGUFs (issue 17): llama.cpp's graphs for these archs read no
window key and attend over the whole context, so the writer makes the context the window (within it,
sliding-window attention is full attention). A Mistral-shaped model with its window is written with
context_length = window, reads back as a windowless model of that context, and both ours and llama.cpp give
the windowed model's logits up to that length. Gemma's windows, which llama.cpp does run, are
test_gguf_gemma.py's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.loaders.gguf import read_gguf, read_gguf_header, write_gguf
from lmforge.loaders.hf import hf_architecture
from tests.loaders.gguf.helpers import load, random_model, tiny_cfg

WINDOW = 16

VARIANTS = {
    # (config changes, llama.cpp arch, transformers class it exports as)
    "mistral": (dict(sliding_window=WINDOW), "llama", "MistralForCausalLM"),
    "qwen2-some-layers": (dict(sliding_window=WINDOW, sliding_layers=[1], qkv_bias=True), "qwen2", "Qwen2ForCausalLM"),
    "qwen3": (dict(sliding_window=WINDOW, qk_norm=True), "qwen3", "Qwen3ForCausalLM"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_window_becomes_the_context(variant, tiny_tokenizer, tmp_path):
    changes, arch, hf = VARIANTS[variant]
    cfg = tiny_cfg(tiny_tokenizer, **changes)
    assert hf_architecture(cfg) == hf
    model = random_model(cfg, emb_scale=4.0)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, model.state_dict(), tiny_tokenizer, qtype="f32")
    metadata, _ = read_gguf_header(path)
    assert metadata["general.architecture"] == arch and metadata[f"{arch}.context_length"] == WINDOW
    assert not any("sliding_window" in k for k in metadata)
    g = read_gguf(path)
    assert (g.config.context_length, g.config.sliding_window, g.config.sliding_layers) == (WINDOW, None, None)
    assert g.config.diff(cfg.replace(context_length=WINDOW, sliding_window=None, sliding_layers=None)) == []
    x = torch.randint(0, cfg.vocab_size, (2, WINDOW), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        windowed = model(x)
        torch.testing.assert_close(load(g)(x), windowed, atol=1e-5, rtol=1e-5)
        # past the window the window matters: a file keeping the full context would run a different model
        longer = torch.cat([x, x], 1)
        assert not torch.allclose(model(longer)[:, WINDOW:], _windowless(model)(longer)[:, WINDOW:], atol=1e-3)


def _windowless(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights without the window: past it, what a file whose context were not shortened would give."""
    from lmforge.model.gpt import GPT

    other = GPT(model.config.replace(sliding_window=None, sliding_layers=None)).eval()
    other.load_state_dict(model.state_dict())
    return other


def test_a_window_longer_than_the_context_changes_nothing(tiny_tokenizer, tmp_path):
    cfg = tiny_cfg(tiny_tokenizer, sliding_window=4096)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_model(cfg).state_dict(), tiny_tokenizer, qtype="f32")
    assert read_gguf_header(path)[0]["llama.context_length"] == cfg.context_length == 64


def test_llama_cpp_runs_the_windowed_model_up_to_the_window(tiny_tokenizer, tmp_path):
    """llama.cpp itself (skipped without llama-cpp-python) gives the windowed model's logits over the window."""
    from tests.loaders.gguf.test_gguf_moe import llama_cpp_run

    cfg = tiny_cfg(tiny_tokenizer, sliding_window=WINDOW)
    model = random_model(cfg, emb_scale=4.0)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, model.state_dict(), tiny_tokenizer, qtype="f32")
    prompt = torch.randint(0, cfg.vocab_size, (WINDOW,), generator=torch.Generator().manual_seed(3)).tolist()
    logits, _ = llama_cpp_run(path, prompt, new_tokens=0)
    with torch.no_grad():
        expected = model(torch.tensor([prompt]))[0].numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
