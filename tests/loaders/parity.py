"""The one parity check of an imported family against transformers, shared by the family tests."""

from __future__ import annotations

from typing import Callable

import torch

from lmforge.engine.generate import Engine
from lmforge.engine.sampling import SamplingParams
from lmforge.model.gpt import router_logits
from lmforge.model.kv_cache import KVCache

NEW_TOKENS = 16


def prompts(vocab: int) -> list[list[int]]:
    """Two random prompts of different lengths (the Engine left-pads them into one batch)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (19, 11)]


def assert_matches_transformers(ref: torch.nn.Module, ours: torch.nn.Module, tokenizer,
                                also: Callable[[torch.Tensor], None] | None = None) -> None:
    """Logits within 1e-4, cached decoding == full recomputation, and 16 greedy tokens identical to
    transformers' `generate`, through our Engine, for two prompts of different lengths in one batch.
    `also(idx)` runs a family's own check on the same ids (e.g. the experts chosen per token)."""
    vocab = ours.config.vocab_size
    idx = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(idx)
        torch.testing.assert_close(full, ref(idx).logits, atol=1e-4, rtol=1e-4)
        if also is not None:
            also(idx)
        cache = KVCache.for_model(ours.config, 2)
        steps = [ours(idx[:, :7], cache=cache)] + [ours(idx[:, t:t + 1], cache=cache) for t in range(7, 24)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    ref.generation_config.eos_token_id = None
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    batch = Engine(ours, tokenizer, fast=False).complete(prompts(vocab), params)
    for prompt, got in zip(prompts(vocab), batch):
        x = torch.tensor([prompt])
        theirs = ref.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert got.ids == theirs
        assert len(set(theirs)) > 2  # not one token repeated: a comparison that can fail


def their_choices(ref: torch.nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """transformers' chosen experts per layer, (B*T, k) sorted, read by a hook on each layer's router
    (`mlp.gate`, in Mixtral and Qwen3-MoE alike)."""
    chosen, hooks = [], []
    for layer in ref.model.layers:
        hooks.append(layer.mlp.gate.register_forward_hook(lambda m, i, out: chosen.append(out[2].sort(-1).values)))
    try:
        with torch.no_grad():
            ref(idx)
    finally:
        for h in hooks:
            h.remove()
    return chosen


def our_choices(ours: torch.nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """Our chosen experts per layer, (B*T, k) sorted, from the router logits the forward pass kept."""
    with torch.no_grad():
        ours(idx)
    k = ours.config.experts_per_token
    return [logits.float().softmax(-1).topk(k, dim=-1).indices.sort(-1).values for logits in router_logits(ours)]


def assert_moe_matches_transformers(ref: torch.nn.Module, ours: torch.nn.Module, tokenizer) -> None:
    """`assert_matches_transformers`, plus the same experts chosen per token in every layer as
    transformers' router chose."""

    def same_experts(idx: torch.Tensor) -> None:
        mine, theirs = our_choices(ours, idx), their_choices(ref, idx)
        assert len(mine) == len(theirs) == ours.config.n_layers
        for a, b in zip(mine, theirs):
            assert torch.equal(a, b)
        assert len(torch.unique(mine[0])) == ours.config.n_experts  # every expert is used: the test can fail

    assert_matches_transformers(ref, ours, tokenizer, also=same_experts)


def assert_adapter_matches_peft(base_dir, targets: str, tmp_path) -> dict:
    """LoRA under PEFT's names on the model directory `base_dir` (as transformers saved it): ours with random
    adapters on `targets`, saved; peft puts the adapter on transformers' model and computes our logits, adapted
    and merged. Returns what `apply_lora` adapted (`LoRAInfo.modules`)."""
    import warnings

    import pytest

    peft = pytest.importorskip("peft")
    import transformers

    from lmforge.loaders.model_dir import load_model
    from lmforge.loaders.peft import apply_lora, save_adapter
    from lmforge.model.lora import merge_lora
    from tests.model.test_lora import randomize_lora

    ours = load_model(base_dir)
    info = apply_lora(ours, targets=targets, rank=4, alpha=8)
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that it ignores our "lmforge" key
        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), atol=1e-4, rtol=1e-4)
        merged = theirs.merge_and_unload()
        merge_lora(ours)
        torch.testing.assert_close(ours(idx), merged(idx).logits, atol=1e-4, rtol=1e-4)
    return info.modules
